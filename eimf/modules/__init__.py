"""Single-device building blocks shared by the backbones (no Ray, no model-level state)."""
from eimf.modules.capsule import CapsuleRouting, squash
from eimf.modules.self_attentive import SelfAttentiveExtractor

__all__ = ["CapsuleRouting", "SelfAttentiveExtractor", "squash"]
