"""torchrun entry point: `torchrun --nproc-per-node N launch/train.py --config ... --shards ... --run-dir ...`.

A thin wrapper over avs_dist.train.main for launchers that want a script path rather than
`-m avs_dist.train` (what slurm/train.sbatch runs); `avs-dist train --nproc N` does the same
with a free port.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avs_dist.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
