"""Models: bundled presets and offline loading of the frozen base."""

from fedslm.models.load import BaseModel, fingerprint, load_base

__all__ = ["BaseModel", "fingerprint", "load_base"]
