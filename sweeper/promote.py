"""`python -m sweeper.promote`: see sweeper/registry/promote.py."""

import sys

from sweeper.registry.promote import main

if __name__ == "__main__":
    sys.exit(main())
