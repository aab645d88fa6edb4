"""Block-diffusion decoding as published for LLaDA2.0 (../shared/docs/llada2.md), with a KV cache.

Each sequence is its prompt followed by MASK up to a whole number of blocks. Blocks are decoded
left to right, from the one holding the prompt's end: up to `steps` denoising forwards per block,
each committing every still-masked position whose confidence exceeds `threshold`, and at least
the step's quota of the most confident ones. Committed tokens are never remasked. A finished
block's K/V go into the cache with one more forward of its final tokens, so every denoising
forward processes exactly one block per sequence.

Batches: sequences are left-padded by whole blocks so that all decode the same global block
index together; padding rows are masked out as keys and each sequence keeps its own positions
(blocks aligned to its own position 0), so a sequence decodes exactly as it would alone.

On CUDA the denoising step (forward + commit decision) can replay a CUDA graph: it reads static
buffers (the block, its positions, a static cache) and the cache write stays outside it. The only
host syncs are one per step ("is anything still masked?") and one per block (EOS).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch

DEFAULT_EOS_ID = 156892
DEFAULT_MASK_ID = 156895


@dataclass
class GenerationStats:
    forwards: int = 0                 # denoising forwards (one block per sequence each)
    cache_writes: int = 0             # forwards that wrote K/V (prefill + finished blocks)
    committed_tokens: int = 0         # tokens committed over the batch
    time_per_forward_s: float = 0.0   # mean time of one denoising step (forward + decision)
    wall_time_s: float = 0.0          # the whole call
    peak_memory_bytes: Optional[int] = None  # CUDA only
    cuda_graph: bool = False
    # [forwards, moe_layers, batch]: distinct experts the block of each sequence routed to
    # (NaN where the sequence was not decoding); None when the MoE layers do not report routes.
    unique_experts: Optional[torch.Tensor] = None
    # same shape, block policies only: coreset size, and picks outside the coreset (must be 0)
    coreset_size: Optional[torch.Tensor] = None
    outside_coreset: Optional[int] = None

    @property
    def tokens_per_forward(self) -> float:
        return self.committed_tokens / max(self.forwards, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.committed_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def mean_unique_experts(self) -> Optional[float]:
        """Distinct experts per block, averaged over MoE layers and denoising forwards."""
        if self.unique_experts is None or self.unique_experts.numel() == 0:
            return None
        return float(torch.nanmean(self.unique_experts))

    @property
    def mean_coreset_size(self) -> Optional[float]:
        if self.coreset_size is None or self.coreset_size.numel() == 0:
            return None
        return float(torch.nanmean(self.coreset_size))


@dataclass
class GenerationResult:
    tokens: List[List[int]]           # generated tokens per sequence, up to and including EOS
    stats: GenerationStats = field(default_factory=GenerationStats)


# ---------------------------------------------------------------------------------------------
# Inputs


def _as_prompts(input_ids) -> List[List[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, P] or [P], got shape {tuple(input_ids.shape)}")
        return input_ids.tolist()
    if isinstance(input_ids, Sequence) and input_ids and all(isinstance(t, int) for t in input_ids):
        return [list(input_ids)]
    if isinstance(input_ids, Sequence) and all(isinstance(p, Sequence) for p in input_ids):
        prompts = [list(p) for p in input_ids]
        if all(all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompts):
            return prompts
    raise TypeError("input_ids must be a list of lists of ints, a list of ints, or an int tensor")


def _check_args(prompts, vocab_size, gen_length, block_length, steps, threshold, temperature,
                top_k, top_p, mask_id):
    if not prompts:
        raise ValueError("input_ids must hold at least one sequence")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"input_ids[{i}] is empty: every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"input_ids[{i}] holds token {bad[0]} outside [0, {vocab_size})")
        if mask_id in p:
            raise ValueError(f"input_ids[{i}] holds the mask token {mask_id}")
    for name, value in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(threshold, (int, float)) or threshold != threshold:
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id {mask_id} is outside the vocabulary [0, {vocab_size})")


def quota_schedule(block_length: int, steps: int) -> List[int]:
    """Tokens to commit at least, per step: block_length // steps, remainder to the first steps."""
    base, extra = divmod(block_length, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


# ---------------------------------------------------------------------------------------------
# The decision of one step (device ops only)


def pick_tokens(logits, temperature: float, top_k: Optional[int], top_p: Optional[float],
                generator=None):
    """Candidate token and its probability per row of logits [..., V] (fp32)."""
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    if temperature > 0:
        probs = (logits / temperature).softmax(-1)
        flat = probs.reshape(-1, probs.shape[-1])
        tok = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    else:
        probs = logits.softmax(-1)
        tok = probs.argmax(-1)
    conf = probs.gather(-1, tok[..., None]).squeeze(-1)
    return tok, conf


def commit_mask(conf, active, threshold: float, quota):
    """Positions to commit: every active one above threshold, else the top-`quota` active ones.

    (If at least `quota` pass the threshold those are exactly the committed ones; otherwise the
    top `min(quota, #active)` by confidence, which include all that pass.) quota: int or a
    0-dim device tensor.
    """
    conf = conf.masked_fill(~active, float("-inf"))
    order = conf.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(conf.shape[-1], device=conf.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return active & ((conf > threshold) | (rank < quota))


# ---------------------------------------------------------------------------------------------
# Routing statistics


def _moe_modules(model) -> list:
    return [m for m in model.modules() if hasattr(m, "last_route")]


def route_stats(modules, rows: int, unique_out, coreset_out, outside_out):
    """Write unique experts (and coreset size / outside picks) of the last `rows` rows routed by
    each MoE layer into [layers, B] buffers. Device ops only."""
    for i, m in enumerate(modules):
        route = m.last_route
        ids = route.topk_ids[:, -rows:].long()
        B, E = ids.shape[0], _num_experts(m, route)
        hit = torch.zeros(B, E + 1, dtype=torch.bool, device=ids.device)
        hit.scatter_(1, torch.where(ids >= 0, ids, E).view(B, -1), True)
        unique_out[i] = hit[:, :E].sum(-1)
        if coreset_out is not None and route.coreset is not None:
            # The routing blocks that cover those rows (one, unless the policy cuts smaller ones).
            size = getattr(getattr(m, "policy", None), "block_size", rows)
            n_blocks = -(-rows // size)
            blocks = route.coreset[:, -n_blocks:]
            coreset_out[i] = blocks.sum(-1).float().mean(1)
            outside_out[i] = (hit[:, :E] & ~blocks.any(1)).sum(-1)


def _num_experts(module, route) -> int:
    if route.coreset is not None:
        return route.coreset.shape[-1]
    cfg = getattr(module, "router_cfg", None) or getattr(getattr(module, "gate", None), "config", None)
    return cfg.num_experts


# ---------------------------------------------------------------------------------------------
# Decoding


def _wants_graph(model, device, cuda_graph, temperature, generator) -> bool:
    if cuda_graph is False or device.type != "cuda":
        if cuda_graph:
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        return False
    from .patch import is_patched

    if not is_patched(model):
        if cuda_graph:
            raise ValueError("cuda_graph=True needs a patched model (patch_model): the "
                             "unpatched MoE layers loop over experts with host syncs")
        return False
    if temperature > 0 and generator is not None:
        if cuda_graph:
            raise ValueError("cuda_graph=True samples with the default CUDA generator; "
                             "pass generator=None")
        return False
    return True


@torch.no_grad()
def generate(model, input_ids: Union[torch.Tensor, List[List[int]], List[int]],
             gen_length: int = 256, block_length: int = 32, steps: int = 32,
             threshold: float = 0.95, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_id: Optional[int] = None,
             mask_id: Optional[int] = None, use_cache: bool = True,
             cuda_graph: Optional[bool] = None, stats: bool = True, generator=None,
             on_block: Optional[Callable[[int, int], None]] = None) -> GenerationResult:
    """Decode `gen_length` tokens after each prompt with LLaDA2 block diffusion.

    model: LLaDA2MoeModelLM (patched or not). input_ids: prompts, a list of lists of ints (any
    lengths) or an int tensor [B, P]. temperature 0 takes the argmax; above 0 samples (top_k,
    top_p filter first). eos_id / mask_id default to the model config's (else LLaDA2.0's).
    use_cache=False recomputes every earlier block at each step (the published, slow way).
    cuda_graph: None = on for patched models on CUDA. on_block(done, total) is called after
    each block (progress bars). Returns tokens per sequence, cut after the first EOS.
    """
    start_time = time.perf_counter()
    config = model.config
    eos_id = getattr(config, "eos_token_id", None) if eos_id is None else eos_id
    eos_id = DEFAULT_EOS_ID if eos_id is None else eos_id
    mask_id = getattr(config, "mask_token_id", None) if mask_id is None else mask_id
    mask_id = DEFAULT_MASK_ID if mask_id is None else mask_id
    prompts = _as_prompts(input_ids)
    _check_args(prompts, config.vocab_size, gen_length, block_length, steps, threshold,
                temperature, top_k, top_p, mask_id)
    param = next(model.parameters())
    device = param.device
    graph = _wants_graph(model, device, cuda_graph, temperature, generator) and use_cache
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Layout: each sequence left-padded by whole blocks so all decode global block `first` first.
    bl, B, G = block_length, len(prompts), gen_length
    steps = min(steps, gen_length)  # as published (minimal_topk = 1)
    first_own = [len(p) // bl for p in prompts]
    n_own = [-(-(len(p) + G) // bl) for p in prompts]
    first = max(first_own)
    pad_blocks = [first - f for f in first_own]
    last_block = [first + n - f - 1 for n, f in zip(n_own, first_own)]
    total = max(last_block) + 1
    x = torch.full((B, total * bl), mask_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        x[i, : pad_blocks[i] * bl] = eos_id
        x[i, pad_blocks[i] * bl: pad_blocks[i] * bl + len(p)] = torch.tensor(p)
    offsets = torch.tensor(pad_blocks)[:, None] * bl
    positions = (torch.arange(total * bl)[None] - offsets).to(device)
    valid = positions >= 0
    x = x.to(device)
    gen_start = torch.tensor([pad_blocks[i] * bl + len(p) for i, p in enumerate(prompts)],
                             device=device)

    cache = None
    st = GenerationStats(cuda_graph=graph)
    if use_cache:
        # On CUDA the cache is static (fixed shapes) graphed or not, so that a graphed step and
        # an eager one run the same attention and give the same tokens.
        cache = model.new_cache(B, total * bl, static=device.type == "cuda")
        if first > 0:  # prefill: the prompt's full blocks
            model(x[:, : first * bl], positions[:, : first * bl], past_key_values=cache,
                  attention_mask=valid[:, : first * bl], block_length=bl, write_cache=True,
                  return_logits=False)
            st.cache_writes += 1

    # Static buffers of one step (what a CUDA graph reads and writes).
    # Filled with valid values: the graph's warm-up steps run before the first block is loaded
    # (garbage token ids there would index the embedding out of bounds).
    block = torch.full((B, bl), mask_id, dtype=torch.long, device=device)
    block_pos = torch.zeros(B, bl, dtype=torch.long, device=device)
    running = torch.zeros(B, 1, dtype=torch.bool, device=device)
    quota = torch.zeros((), dtype=torch.long, device=device)
    committed = torch.zeros((), dtype=torch.long, device=device)
    moe = _moe_modules(model) if stats else []
    max_forwards = (total - first) * steps
    n_layers = len(moe)
    unique = torch.full((max_forwards, n_layers, B), float("nan"), device=device)
    coreset = torch.full_like(unique, float("nan"))
    outside = torch.zeros(max_forwards, n_layers, B, dtype=torch.long, device=device)
    forward_index = torch.zeros((), dtype=torch.long, device=device)
    prefix = {"end": 0}

    def step():
        """One denoising forward and its commit decision: device ops only, no host sync."""
        if use_cache:
            logits = model(block, block_pos, past_key_values=cache, block_length=bl).logits
        else:  # recompute every earlier block, as the published generate does
            end = prefix["end"]
            ids = torch.cat((x[:, : end - bl], block), dim=1)
            logits = model(ids, positions[:, :end], attention_mask=valid[:, :end],
                           block_length=bl).logits[:, -bl:]
        tok, conf = pick_tokens(logits, temperature, top_k, top_p, generator)
        active = (block == mask_id) & running
        commit = commit_mask(conf, active, threshold, quota)
        block.copy_(torch.where(commit, tok, block))
        committed.add_(commit.sum())
        if n_layers:
            u = torch.zeros(n_layers, B, device=device)
            c = torch.full((n_layers, B), float("nan"), device=device)
            o = torch.zeros(n_layers, B, dtype=torch.long, device=device)
            route_stats(moe, bl, u, c, o)
            keep = running[:, 0]
            unique.index_copy_(0, forward_index[None], torch.where(keep, u, float("nan"))[None])
            coreset.index_copy_(0, forward_index[None], torch.where(keep, c, float("nan"))[None])
            outside.index_copy_(0, forward_index[None], (o * keep)[None])
        forward_index.add_(1)

    replay = step
    if graph:
        replay = _capture(step, block, committed, forward_index, unique, coreset, outside)

    timer = _StepTimer(device)
    done = [False] * B
    columns = torch.arange(total * bl, device=device)
    schedule = quota_schedule(bl, steps)
    for b in range(first, total):
        is_running = [not done[i] and b <= last_block[i] for i in range(B)]
        if not any(is_running):
            break
        lo, hi = b * bl, (b + 1) * bl
        block.copy_(x[:, lo:hi])
        block_pos.copy_(positions[:, lo:hi])
        running.copy_(torch.tensor(is_running, device=device)[:, None])
        prefix["end"] = hi
        for s in range(steps):
            if not bool(((block == mask_id) & running).any()):  # the step's one host sync
                break
            quota.fill_(schedule[s])
            timer.start()
            replay()
            timer.stop()
            st.forwards += 1
        x[:, lo:hi] = block
        # Stop at EOS (checked once the block is done, as published).
        seen = (x == eos_id) & (columns >= gen_start[:, None]) & (columns < hi)
        for i, hit in enumerate(seen.any(1).tolist()):
            done[i] = done[i] or hit or b >= last_block[i]
        if on_block is not None:
            on_block(b - first + 1, total - first)
        if use_cache and not all(done):
            model(block, block_pos, past_key_values=cache, block_length=bl, write_cache=True,
                  return_logits=False)
            st.cache_writes += 1

    tokens = []
    for i, p in enumerate(prompts):
        start = pad_blocks[i] * bl + len(p)
        out = x[i, start: start + G].tolist()
        tokens.append(out[: out.index(eos_id) + 1] if eos_id in out else out)

    st.committed_tokens = int(committed)
    st.time_per_forward_s = timer.mean()
    if n_layers:
        n = st.forwards
        st.unique_experts = unique[:n].cpu()
        if any(getattr(m.last_route, "coreset", None) is not None for m in moe):
            st.coreset_size = coreset[:n].cpu()
            st.outside_coreset = int(outside[:n].sum())
    if device.type == "cuda":
        st.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    st.wall_time_s = time.perf_counter() - start_time
    return GenerationResult(tokens, st)


def _capture(step, block, committed, forward_index, *records):
    """Warm up `step` on a side stream, capture it in a CUDA graph, restore the state it touched."""
    saved = [t.clone() for t in (block, committed, forward_index, *records)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compiles kernels, settles allocations
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for t, s in zip((block, committed, forward_index, *records), saved):
        t.copy_(s)
    return graph.replay


class _StepTimer:
    """Mean step time: CUDA events on the GPU (read once at the end), perf_counter elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append([event, None])
        else:
            self.marks.append([time.perf_counter(), None])

    def stop(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[-1][1] = event
        else:
            self.marks[-1][1] = time.perf_counter()

    def mean(self) -> float:
        if not self.marks:
            return 0.0
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.marks) / 1e3 / len(self.marks)
        return sum(b - a for a, b in self.marks) / len(self.marks)
