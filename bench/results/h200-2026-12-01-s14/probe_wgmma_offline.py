# Run: PYTHONPATH=<tree> python probe_wgmma_offline.py (imports tests/offline_compile.py from /work/main: edit the path)
import sys, torch, dataclasses
sys.argv = ["x"]
import importlib.util
spec = importlib.util.spec_from_file_location("oc", "/work/main/tests/offline_compile.py")
oc = importlib.util.module_from_spec(spec); spec.loader.exec_module(oc)
launches = oc.capture_launches()
from dmoe_triton import launch
from dmoe_triton.moe import decode_down_combine, decode_gate_up, down_arrivals
import dmoe_triton; print(dmoe_triton.__file__)
E, H, I, top_k, T = 256, 2048, 512, 8, 32
dtype = torch.bfloat16
for name, cfg in (("default", launch.DEFAULT_DECODE),
                  ("32 cols 4 warps", dataclasses.replace(launch.DEFAULT_DECODE, block_h=32, warps_down=4))):
    launches.clear()
    hidden = torch.zeros(T, H, dtype=dtype)
    ids = torch.arange(T * top_k, dtype=torch.int32).view(T, top_k) % E
    arr = down_arrivals(H, hidden.device, cfg)
    acts = decode_gate_up(hidden, ids, torch.empty(E, 2 * I, H, dtype=dtype), arr, cfg, None)
    decode_down_combine(acts, ids, torch.ones(T, top_k), torch.empty(E, H, I, dtype=dtype),
                        torch.empty(T, H, dtype=dtype), arr, cfg, None)
    for fn, args, kwargs in launches:
        k = oc.compile_for_hopper(fn, args, dict(kwargs))
        ttgir = k.asm["ttgir"]
        print(name, fn.__name__, "warp_group_dot:", ttgir.count("ttng.warp_group_dot "),
              "mma v2 (tt.dot mma):", ttgir.count("tt.dot "), "shared", k.metadata.shared)
