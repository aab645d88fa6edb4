"""Programmatic dependent launch (PDL, sm_90+): the next kernel's programs may start while the
previous kernel in the stream finishes, hiding the launch latency between the small kernels of
a denoising step (about 0.5 us a boundary on the H200, a chain of graphed copy kernels,
2026-11-30). A kernel launched with `launch_pdl=True` calls `wait_previous_kernel` before any
load or store: it returns once the previous kernel has finished and its writes are visible.
Only then does it let its own successor start, so a kernel that passed its wait knows every
earlier kernel has finished too (a successor may then read their outputs, and memory freed by
them may be reused). A kernel that does not wait must not be launched with PDL.
"""
import triton
import triton.language as tl


@triton.jit
def wait_previous_kernel(PDL: tl.constexpr):
    """With PDL: wait for the previous kernel, then allow the next one to launch; else nothing
    (the interpreter and pre-Hopper GPUs launch without PDL)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
