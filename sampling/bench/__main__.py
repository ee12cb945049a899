"""``python -m sampling.bench``: the same as ``python -m sampling``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
