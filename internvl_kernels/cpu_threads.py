"""CPU threading helpers: the quantizers run many small element-wise ops for which torch's intra-op threads only add
synchronisation (measured 10-50x slower on a loaded 2-core machine), so they run single-threaded on CPU tensors."""
from __future__ import annotations

import functools

import torch


class single_thread_on_cpu:
    def __init__(self, device="cpu"):
        self.cpu = torch.device(device).type == "cpu"
        self.n = None

    def __enter__(self):
        if self.cpu:
            self.n = torch.get_num_threads()
            if self.n != 1:
                torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.cpu and self.n not in (None, 1):
            torch.set_num_threads(self.n)


def cpu_single_threaded(fn):
    """Decorator: run ``fn`` single-threaded when its first tensor argument is on the CPU."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next((a.device for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), "cpu")
        with single_thread_on_cpu(dev):
            return fn(*args, **kwargs)

    return wrapper
