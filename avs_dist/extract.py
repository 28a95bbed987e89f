"""`avs-dist extract`: raw_videos/ of an AVSBench layout -> visual_frames/, audio_wav/, audio_log_mel/
exactly as AVSBench's preprocessing scripts make them (thin: avs_dist/video/extract.py)."""
from __future__ import annotations

import argparse
import os
import sys

from avs_dist.helpformat import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    from avs_dist.video import extract as lib

    p = argparse.ArgumentParser(prog="avs-dist extract", description=lib.__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data-root", required=True, help="folder holding Single-source/ and/or Multi-sources/")
    p.add_argument("--subset", required=True, choices=("s4", "ms3"))
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                   help="videos decoded at once (each ffmpeg uses one thread)")
    p.add_argument("--size", type=int, default=lib.REFERENCE_SIZE,
                   help="frame side after cv2.resize (the reference: 224; the masks must have this size for pack)")
    p.add_argument("--overwrite", action="store_true", help="redo videos that are already complete")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    lib.extract(a.data_root, a.subset, workers=a.workers, size=a.size, overwrite=a.overwrite,
                progress=not a.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
