"""`python -m avs_dist.train ...`: one rank, the same as `python -m avs_dist.launch.rank ...`
(the training package itself never imports the launch layer; this entry point is a launcher)."""
import sys

from avs_dist.launch.rank import main

if __name__ == "__main__":
    sys.exit(main())
