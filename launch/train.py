"""torchrun entry point: `torchrun --nproc-per-node N launch/train.py --config ... --shards ... --run-dir ...`.

The same as `torchrun ... -m avs_dist.launch.rank` (avs_dist/launch/rank.py), for launchers
that want a script path; `avs-dist train --nproc N` starts and supervises torchrun itself.
"""
import sys

from avs_dist.launch.rank import main

if __name__ == "__main__":
    sys.exit(main())
