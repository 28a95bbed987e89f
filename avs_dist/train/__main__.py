"""`python -m avs_dist.train ...`: one rank, as `torchrun -m avs_dist.train` starts it (avs_dist/launch/rank.py)."""
import sys

from avs_dist.launch.rank import main

if __name__ == "__main__":
    sys.exit(main())
