"""The ``clip`` method (image-report contrastive training): ``config.py`` its section, ``method.py`` the towers
and loss, ``loader.py`` the image-report loader, ``pipeline.py`` the registry entry and its evaluation hook."""
