"""Slurm entry point: `python launch/submit.py --config ... --shards ... --run-dir ... --nodes 2 ...`.

The same as `avs-dist submit` (avs_dist/launch/submit.py).
"""
import sys

from avs_dist.launch.submit import main

if __name__ == "__main__":
    sys.exit(main())
