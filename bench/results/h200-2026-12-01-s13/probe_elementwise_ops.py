"""Which aten ops launch the small elementwise kernels of a forward (thirteenth session; run
from the repository root on a GPU)."""
import sys
sys.path.insert(0, "bench")
import torch
from torch.profiler import ProfilerActivity, profile
from dmoe_triton import RoutingPolicy, patch_model
from dmoe_triton.models import LLaDA2MoeConfig
from dmoe_triton.testing import build_model
from bench_e2e import prepare_step, step_fn

dev = torch.device("cuda")
model = build_model(LLaDA2MoeConfig(num_hidden_layers=4), dev)
patch_model(model, RoutingPolicy.dmoe(0.6, 16))
step = prepare_step(model, 1, 512)
fn = step_fn(model, step)
with torch.no_grad():
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                 with_stack=True) as prof:
        fn(); torch.cuda.synchronize()
seen = 0
for e in prof.events():
    ks = [k.name for k in getattr(e, "kernels", [])]
    if any("nocast" in k or "copy" in k for k in ks) and e.name.startswith("aten::") and seen < 40:
        seen += 1
        print("==", e.name, e.input_shapes, [k[:60] for k in ks])
        for fr in (e.stack or [])[:10]:
            print("    ", fr)
