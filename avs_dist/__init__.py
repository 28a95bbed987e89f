"""avs-dist: distributed training harness for audio-visual segmentation (AVSBench)."""
__version__ = "0.1.0"
