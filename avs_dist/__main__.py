import sys

from avs_dist.cli import main

sys.exit(main())
