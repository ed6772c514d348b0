"""``python -m quantize`` — see :mod:`quantize.cli` (``python -m quantize --help``)."""
import sys

if __name__ == "__main__":
    from quantize import _interrupt

    _interrupt.install()  # before the (long) torch import: a Ctrl-C during it is never lost
    try:
        from quantize.cli import main

        _interrupt.check()
        code = main()
    except KeyboardInterrupt:  # Ctrl-C before main() took over (main itself reports one line and returns 130)
        print("interrupted; nothing was written", file=sys.stderr)
        code = 130
    sys.exit(code)
