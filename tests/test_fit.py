"""The decode path's launch shapes fit on Hopper, checked on the CPU: offline_compile.py compiles
the kernels for sm_90 (in a process of its own, without the interpreter) with the config that
launch.moe_launch picks, and reports each program's shared memory and registers. A shape that
does not fit fails only on the GPU (OutOfResources), which CI never sees: the fourteenth
session's default down asked for 262400 bytes at 33-64 tokens (Triton 3.6; 262656 with 3.9)."""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch

import dmoe_triton
from dmoe_triton import launch
from dmoe_triton.launch import SKINNY_MAX_ROWS, skinny_block_n

MAX_SHARED_PER_PROGRAM = 232448  # bytes a program may take on sm_90 (227 KB)
SHARED_PER_SM = 233472           # an H100's or H200's SM; CUDA keeps 1 KB per resident program
REGISTERS_PER_SM = 65536         # 32-bit registers of an sm_90 SM, allocated to a warp in
REGISTER_UNIT = 256              # units of 256 (8 a thread)


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


pytestmark = pytest.mark.skipif(not _nvidia_backend(),
                                reason="this Triton has no NVIDIA backend to compile with")


@functools.lru_cache(maxsize=None)
def shared_memory(*args) -> dict:
    """{kernel name: {"shared": bytes, "warps": n, "registers": per thread}} from
    offline_compile.py (its arguments: TOKENS DTYPE, TOKENS fp8, or "skinny" TOKENS BLOCK_N)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The same dmoe_triton as this process's, wherever it was installed from.
    package_root = os.path.dirname(os.path.dirname(dmoe_triton.__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    script = os.path.join(os.path.dirname(__file__), "offline_compile.py")
    run = subprocess.run([sys.executable, script, *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


DECODE_KERNELS = {"moe_gate_up_decode_kernel", "moe_down_combine_decode_kernel"}


@pytest.mark.parametrize("tokens,dtype", [(32, "bfloat16"), (33, "bfloat16"), (64, "float32"),
                                          (32, "fp8"), (64, "fp8")])
def test_decode_programs_fit_in_shared_memory(tokens, dtype):
    """One 32-token block, the first size past it (tokens padded to 64), fp32 (its own
    pipeline depth, launch.pipeline_stages) and FP8 experts (launch.DEFAULT_DECODE_FP8, with
    the activations' scaling launch before them)."""
    kernels = shared_memory(tokens, dtype)
    assert set(kernels) == DECODE_KERNELS | ({"scaled_rows_kernel"} if dtype == "fp8" else set())
    for name, kernel in kernels.items():  # the MoE kernels pipeline through shared memory
        least = 1 if name in DECODE_KERNELS else 0
        assert least <= kernel["shared"] <= MAX_SHARED_PER_PROGRAM, (name, tokens, dtype, kernel)


# DEFAULT_DECODE_FP8 asks for 2 gate/up programs per SM, but one takes 147456 bytes at 32
# tokens and 163840 at 33-64 (Triton 3.6 and 3.9), so the grid's second half waits for the
# first (found in the 22nd session; the FP8 sweep's programs_per_sm=1 variants are to time the
# fix on the GPU). Both sizes: a fix for 32 tokens alone (3 stages) would still not fit at 64.
FP8_TWO_DO_NOT_FIT = pytest.mark.xfail(strict=True, reason="DEFAULT_DECODE_FP8.programs_per_sm"
                                       " = 2: a program takes 147456 / 163840 bytes at 32 / 64 "
                                       "tokens")


@pytest.mark.parametrize("tokens,dtype", [(32, "bfloat16"), (64, "bfloat16"),
                                          pytest.param(32, "fp8", marks=FP8_TWO_DO_NOT_FIT),
                                          pytest.param(64, "fp8", marks=FP8_TWO_DO_NOT_FIT)])
def test_decode_gate_up_programs_fit_on_an_sm_together(tokens, dtype):
    """As many gate/up programs fit on an SM, in shared memory and in registers, as
    DecodeConfig.programs_per_sm asks for (the persistent grid is SMs x that): the fourteenth
    session's 2 did not (163840 bytes each at 32 tokens), so the items past the SMs' count
    waited for a second wave."""
    fp8 = dtype == "fp8"
    config = launch.moe_launch(tokens, 8, 256, torch.bfloat16 if fp8 else getattr(torch, dtype),
                               torch.device("cpu"), fp8=fp8).decode
    kernel = shared_memory(tokens, dtype)["moe_gate_up_decode_kernel"]
    shared, warps = kernel["shared"], kernel["warps"]
    per_warp = -(-kernel["registers"] * 32 // REGISTER_UNIT) * REGISTER_UNIT
    assert config.programs_per_sm * (shared + 1024) <= SHARED_PER_SM, (
        f"{config.programs_per_sm} programs of {shared} bytes at {tokens} tokens")
    assert config.programs_per_sm * warps * per_warp <= REGISTERS_PER_SM, (
        f"{config.programs_per_sm} programs of {warps} warps x {kernel['registers']} registers")


def test_skinny_programs_fit_in_shared_memory():
    """The widest program launch.skinny_block_n gives (64 columns) at SKINNY_MAX_ROWS rows."""
    tokens, block_n = SKINNY_MAX_ROWS, skinny_block_n(10 ** 6, 132)
    kernel = shared_memory("skinny", tokens, block_n)["skinny_gemm_kernel"]
    assert 0 < kernel["shared"] <= MAX_SHARED_PER_PROGRAM, (tokens, block_n, kernel)
