"""`python -m sweeper.export`: see sweeper/registry/export.py."""

import sys

from sweeper.registry.export import main

if __name__ == "__main__":
    sys.exit(main())
