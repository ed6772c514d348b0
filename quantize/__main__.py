"""``python -m quantize`` — see :mod:`quantize.cli` (``python -m quantize --help``)."""
import sys

from quantize.cli import main

if __name__ == "__main__":
    sys.exit(main())
