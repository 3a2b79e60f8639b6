"""The ``dino`` method (DINOv1/v2/v3 and DINO-X objectives): ``config.py`` its sections, ``method.py`` the
student/teacher module, ``loader.py`` the multi-crop loaders, ``pipeline.py`` the registry entry."""
