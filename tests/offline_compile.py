"""Compile the decode path's MoE kernels for sm_90 without a GPU and print the shared memory a
program of each takes, so that the CPU suite catches a launch shape that would not fit on an
H100 or H200. (The fourteenth session's default down asked for 262400 bytes at 33-64 tokens
with Triton 3.6, 262656 with 3.9, over the 232448 a program may take, and nothing on the CPU
noticed.)

    python tests/offline_compile.py TOKENS DTYPE   # DTYPE: bfloat16, float16 or float32
    python tests/offline_compile.py TOKENS fp8     # FP8 experts, bf16 activations
    python tests/offline_compile.py skinny TOKENS BLOCK_N   # the skinny GEMM (bf16)

prints one JSON object {kernel name: {"shared": bytes, "warps": n, "registers": per thread}}
for the launches that moe_forward's decode path makes at LLaDA2.0-mini's shapes (E 256, top-8,
H 2048, I 512, a shared expert) with launch.moe_launch's config (or the skinny GEMM's one). It
must run without TRITON_INTERPRET (the interpreter's kernels cannot be compiled): test_fit.py
starts it in a process of its own.
The launches are captured instead of run, and compiled as Triton's launcher would specialise
them for these kernels (16-byte aligned pointers, integers equal to 1 as constants, multiples
of 16 marked; no do_not_specialize or bool arguments here). Written by hand rather than
through Triton's private binder so that it runs on Triton 3.6 (the H200's) and 3.9 alike.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type

HOPPER = GPUTarget("cuda", 90, 32)


def capture_launches():
    """Make every @triton.jit launch record (kernel, args, kwargs) in the returned list instead
    of running."""
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    triton.runtime.jit.JITFunction.run = record
    return launches


def compile_for_hopper(fn, args, kwargs):
    """The compiled kernel of one captured launch, for sm_90."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    kwargs.pop("launch_pdl", None)  # a launch attribute, not a compile option
    unknown = set(kwargs) - set(fn.arg_names)
    if unknown:  # a launch option this imitation does not pass on would be dropped silently
        raise TypeError(f"{fn.__name__}: launch keywords not handled here: {sorted(unknown)}")
    signature, constants, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = kwargs[name] if name in kwargs else args[i] if i < len(args) else param.default
        if param.is_constexpr or value is None or (type(value) is int and value == 1):
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor) or type(value) is int:
            signature[name] = mangle_type(value)  # Triton's own type of the argument
            if isinstance(value, torch.Tensor) or value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{fn.__name__}: argument {name} = {value!r} is not handled here")
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=HOPPER,
                          options=options)


def registers(kernel) -> int:
    """Registers a thread of the compiled kernel takes: cuobjdump's resource usage of its cubin
    (the tool ships with Triton's NVIDIA backend; the compiled metadata has no register count
    until the kernel is loaded on a GPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", path],
                               capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1))


def compiled(launches) -> dict:
    """{kernel name: {"shared": bytes, "warps": n, "registers": per thread}} of captured
    launches, compiled for sm_90 as the GPU launches them: with programmatic dependent launch
    where the kernel takes it (the CPU's launches leave it off)."""
    result = {}
    for fn, args, kwargs in launches:
        pdl = {"PDL": True} if "PDL" in fn.arg_names else {}
        kernel = compile_for_hopper(fn, args, dict(kwargs, **pdl))
        result[fn.__name__] = {"shared": kernel.metadata.shared,
                               "warps": kernel.metadata.num_warps,
                               "registers": registers(kernel)}
    return result


def decode_shared_memory(tokens: int, dtype: torch.dtype) -> dict:
    launches = capture_launches()
    from dmoe_triton import launch
    from dmoe_triton.moe import decode_down_combine, decode_gate_up, down_arrivals

    E, H, I, top_k = 256, 2048, 512, 8
    config = launch.moe_launch(tokens, top_k, E, dtype, torch.device("cpu")).decode
    hidden = torch.zeros(tokens, H, dtype=dtype)
    ids = torch.arange(tokens * top_k, dtype=torch.int32).view(tokens, top_k) % E
    weights = torch.ones(tokens, top_k)
    arrivals = down_arrivals(H, hidden.device, config)
    acts = decode_gate_up(hidden, ids, weights, torch.empty(E, 2 * I, H, dtype=dtype), arrivals,
                          config, torch.empty(2 * I, H, dtype=dtype))
    decode_down_combine(acts, ids, weights, torch.empty(E, H, I, dtype=dtype),
                        torch.empty(tokens, H, dtype=dtype), arrivals, config,
                        torch.empty(H, I, dtype=dtype))
    return compiled(launches)


def fp8_decode_shared_memory(tokens: int) -> dict:
    """The decode path with FP8 routed and shared experts (128 x 128 block scales, bf16
    activations) at LLaDA2.0-mini's shapes, with launch.moe_launch's FP8 config fitted to the
    scale blocks as moe_forward does, read natively (fp8_bits off: sm_90's path)."""
    launches = capture_launches()
    from dmoe_triton import launch
    from dmoe_triton.moe import moe_forward_triton
    from dmoe_triton.quant import FP8_DTYPE, Fp8Scales

    E, H, I, top_k = 256, 2048, 512, 8
    w_gate_up = torch.zeros(E, 2 * I, H, dtype=FP8_DTYPE)
    w_down = torch.zeros(E, H, I, dtype=FP8_DTYPE)
    shared = (torch.zeros(2 * I, H, dtype=FP8_DTYPE), torch.zeros(H, I, dtype=FP8_DTYPE))
    scales = Fp8Scales.empty(w_gate_up.shape, w_down.shape)
    scales = Fp8Scales(scales.gate_up, scales.down, scales.block,
                       (scales.gate_up[0].clone(), scales.down[0].clone()))
    hidden = torch.zeros(tokens, H, dtype=torch.bfloat16)
    ids = torch.arange(tokens * top_k, dtype=torch.int32).view(tokens, top_k) % E
    with launch.override(fp8_bits=False):
        moe_forward_triton(hidden, ids, torch.ones(tokens, top_k), w_gate_up, w_down,
                           path="decode", shared=shared, scales=scales)
    return compiled(launches)


def skinny_shared_memory(tokens: int, block_n: int) -> dict:
    """The skinny GEMM (bf16, K 2048) at `tokens` rows with launch.DEFAULT_SKINNY's shape at
    block_n columns."""
    launches = capture_launches()
    from dmoe_triton import launch, skinny

    # CPU tensors stand in for the GPU's here: the launch is captured, not run, so the input
    # checks (which refuse CPU tensors outside the interpreter) are skipped.
    skinny.check_skinny_inputs = lambda *args: None
    shape = dataclasses.replace(launch.DEFAULT_SKINNY, block_n=block_n)
    with launch.override(skinny=shape):
        skinny.skinny_gemm(torch.zeros(tokens, 2048, dtype=torch.bfloat16),
                           torch.zeros(4 * block_n, 2048, dtype=torch.bfloat16),
                           torch.bfloat16)
    return compiled(launches)


if __name__ == "__main__":
    if sys.argv[1] == "skinny":  # offline_compile.py skinny TOKENS BLOCK_N
        print(json.dumps(skinny_shared_memory(int(sys.argv[2]), int(sys.argv[3]))))
    elif sys.argv[2] == "fp8":  # offline_compile.py TOKENS fp8
        print(json.dumps(fp8_decode_shared_memory(int(sys.argv[1]))))
    else:
        print(json.dumps(decode_shared_memory(int(sys.argv[1]), getattr(torch, sys.argv[2]))))
