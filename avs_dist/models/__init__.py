"""Models: the AVSBench AVSModel, the seed's crop branch, frozen VGGish, weight loading."""
from .system import AVSSystem, build_model, to_channels_last

__all__ = ["AVSSystem", "build_model", "to_channels_last"]
