"""The ``distill`` method (knowledge distillation from a frozen teacher): ``config.py`` its section,
``method.py`` the module, ``pipeline.py`` the registry entry (it shares the DINO multi-crop loader)."""
