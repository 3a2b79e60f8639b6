"""Backbones (registry + one feature interface) and heads."""

from medfoundry.models.backbone import Backbone, BackboneOutput
from medfoundry.models.heads import DINOHead
from medfoundry.models.registry import (
    BackboneSpec,
    create_backbone,
    get_spec,
    list_backbones,
    register_backbone,
)

__all__ = [
    "Backbone",
    "BackboneOutput",
    "BackboneSpec",
    "DINOHead",
    "create_backbone",
    "get_spec",
    "list_backbones",
    "register_backbone",
]
