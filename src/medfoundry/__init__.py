"""medfoundry: train, adapt and evaluate vision foundation models for medical imaging."""

__version__ = "0.1.0"
