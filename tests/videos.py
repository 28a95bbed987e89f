"""Small test clips made with imageio-ffmpeg's ffmpeg (the binary the reference runs)."""
from avs_dist.video.encode import pattern_clip as make_clip  # noqa: F401
