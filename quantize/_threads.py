"""CPU threading helpers of the quantizers (defined in :mod:`internvl_kernels.cpu_threads`)."""
from internvl_kernels.cpu_threads import cpu_single_threaded, single_thread_on_cpu

__all__ = ["cpu_single_threaded", "single_thread_on_cpu"]
