import sys


def main(argv=None):
    print("python -m quantize: not built yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
