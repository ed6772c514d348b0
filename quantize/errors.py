"""The user-facing error of ``python -m quantize`` (its own module so the early checks need no torch import)."""


class QuantizeError(RuntimeError):
    """A user-facing error of ``python -m quantize`` (printed without a traceback, exit code 2)."""
