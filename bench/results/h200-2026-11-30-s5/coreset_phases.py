"""Scratch (not committed): where block_coreset_kernel's time goes, and router GEMM variants."""
import importlib.util, pathlib, sys, statistics
import torch, triton, triton.language as tl
sys.path.insert(0, "bench")
from common import capture, time_ms

src = pathlib.Path("dmoe_triton/kernels/routing.py").read_text() if pathlib.Path("dmoe_triton/kernels/routing.py").exists() else pathlib.Path("kernels/routing.py").read_text()
SORT = "ranked = tl.sort(tl.where(e_ok, _key(score, e), NO_KEY), descending=True)"
VOTE = "score += tl.sum(_row_votes(r, VOTE_K), axis=0)"
assert SORT in src and VOTE in src
variants = {"real": src, "nosort": src.replace(SORT, "ranked = tl.where(e_ok, _key(score, e), NO_KEY)"),
            "novote": src.replace(VOTE, "score += tl.sum(tl.where(r > NEG_INF, r, 0.0), axis=0)")}
variants["neither"] = variants["nosort"].replace(VOTE, "score += tl.sum(tl.where(r > NEG_INF, r, 0.0), axis=0)")
out = pathlib.Path("/tmp/cx"); out.mkdir(exist_ok=True)
(out / "policy_codes.py").write_text(pathlib.Path("kernels/policy_codes.py").read_text())
mods = {}
sys.path.insert(0, str(out))
for name, text in variants.items():
    p = out / f"rk_{name}.py"
    p.write_text(text.replace("from .policy_codes", "from policy_codes"))
    spec = importlib.util.spec_from_file_location(f"rk_{name}", p)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); mods[name] = m

@triton.jit
def empty_kernel(x_ptr):
    tl.store(x_ptr + tl.arange(0, 32), tl.zeros([32], tl.uint8))

dev = torch.device("cuda")
E, L = 256, 32
x = torch.randn(1, L, E, device=dev)
bias = torch.zeros(E, device=dev)
core = torch.empty(1, 1, E, dtype=torch.uint8, device=dev)
def t(fn):
    g = capture(fn, 20, warmup=2)
    return time_ms(lambda: g.replay(), 20, 30, dev) * 1e3
rows = []
for warps in (4, 8):
    for name, m in mods.items():
        for pol, code in (("dmoe", 0), ("capacity", 2)):
            from dmoe_triton.kernels.policy_codes import DMOE, CAPACITY
            code = DMOE if pol == "dmoe" else CAPACITY
            fn = lambda m=m, code=code, warps=warps: m.block_coreset_kernel[(1,)](
                x, bias, core, None, None, L, 1, 32, 0.6, 2, 48, E=E, VOTE_K=8, POLICY=code,
                BLOCK_T=32, E_PAD=256, VOTE_COLS=32, num_warps=warps)
            rows.append((f"coreset {pol} {name} w{warps}", t(fn)))
rows.append(("empty kernel", t(lambda: empty_kernel[(1,)](core))))
# router GEMM: 48 weight copies, L2-cold
H = 2048
for T in (32, 512):
    h = torch.randn(T, H, device=dev).bfloat16()
    ws = [torch.randn(E, H, device=dev).bfloat16().float() * 0.02 for _ in range(48)]
    wb = [w.bfloat16() for w in ws]
    i = [0]
    def f32():
        i[0] = (i[0] + 1) % 48; return h.float() @ ws[i[0]].T
    def b16():
        i[0] = (i[0] + 1) % 48; return torch.mm(h, wb[i[0]].T, out_dtype=torch.float32)
    def b16c():  # weight stored [H, E]
        i[0] = (i[0] + 1) % 48; return torch.mm(h, wbt[i[0]], out_dtype=torch.float32)
    wbt = [w.T.contiguous() for w in wb]
    rows.append((f"router fp32 T={T}", t(f32)))
    rows.append((f"router bf16 out fp32 T={T}", t(b16)))
    rows.append((f"router bf16 out fp32 [H,E] T={T}", t(b16c)))
    ref = (h.double() @ ws[0].double().T)
    a = h.float() @ ws[0].T
    b = torch.mm(h, wb[0].T, out_dtype=torch.float32)
    rows.append((f"  max|fp32-f64| T={T}", (a.double() - ref).abs().max().item()))
    rows.append((f"  max|bf16mm-f64| T={T}", (b.double() - ref).abs().max().item()))
    rows.append((f"  argsort equal rows T={T}", (a.argsort(-1, descending=True)[:, :8] == b.argsort(-1, descending=True)[:, :8]).all(-1).float().mean().item()))
for n, v in rows:
    print(f"| {n} | {v:.4g} |")

# PDL: a chain of dependent copy kernels (each reads the previous output), graphed
@triton.jit
def chain_kernel(src, dst, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src + offs, mask=offs < n)
    tl.store(dst + offs, v + 1.0, mask=offs < n)

for nbytes in (1 << 16, 1 << 22):
    n = nbytes // 4
    bufs = [torch.zeros(n, device=dev) for _ in range(2)]
    for pdl in (False, True):
        def chain(pdl=pdl):
            for k in range(20):
                chain_kernel[(triton.cdiv(n, 1024),)](bufs[k % 2], bufs[(k + 1) % 2], n, BLOCK=1024, PDL=pdl, launch_pdl=pdl)
        try:
            bufs[0].zero_(); bufs[1].zero_()
            g = capture(chain, 1, warmup=1)
            bufs[0].zero_(); bufs[1].zero_(); g.replay(); torch.cuda.synchronize()
            ok = bufs[0][0].item() == 20.0
            us = time_ms(lambda: g.replay(), 20, 30, dev) * 1e3
            print(f"| pdl chain {nbytes} B pdl={pdl} per kernel us | {us:.3f} | correct={ok} {bufs[0][0].item()}")
        except Exception as exc:
            print(f"| pdl chain pdl={pdl} failed | {type(exc).__name__}: {exc} |")
