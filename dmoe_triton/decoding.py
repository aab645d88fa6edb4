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

On CUDA the denoising step (forward + commit decision + routing statistics) replays a CUDA
graph: it reads static buffers (the block, its positions, a static cache). The cache write of a
finished span replays a second graph (the span's forward, its K/V left in the cache's scratch
rows) and then appends those rows. Both graphs, with the buffers and the static cache they read,
are kept in `graphs.graph_cache` for the next call of the same layout (graphs.py says what the
key holds, when a graph is not reused, and how much memory is kept). The host syncs: one per
step (reading the "still masked?" flag the step computed, which a step must know before the
next is launched: checking later would run forwards that published decoding does not run) and
one per block (the "done" flags after the EOS check; the next block's running flags are
computed from them on the device).

LLaDA2.1 token editing (`editing_threshold`, ../shared/docs/llada2-family.md): each step also
overwrites written tokens of the block being decoded, and once the block has no mask, up to
`max_post_steps` edit-only steps follow. The whole decision (commit, edit, and whether a
sequence is finished with the block) is device ops inside the step, so a step stays one graph
replay; the step's flag becomes "is any sequence still open on this block?" (the same single
sync per step as without editing).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch

from .graphs import capture, graph_cache, graph_key
from .launch import KERNEL_FLOATS
from .modules import expert_load, moe_layers
from .pick import greedy_pick

DEFAULT_EOS_ID = 156892
DEFAULT_MASK_ID = 156895


@dataclass
class GenerationStats:
    """What one generate() call did and how long it took (times in seconds).

    The time fields split the call: `wall_time_s` (the whole call, perf_counter) holds
    `forwards * time_per_forward_s` (the denoising steps), `prefill_time_s` (the prompts'
    forward into the KV cache, 0 when nothing was prefilled: a prompt shorter than a block, or
    use_cache=False) and `cache_write_time_s` (every finished span's forward writing its K/V,
    summed; 0 when no span was written: a single block, or use_cache=False); the rest is the
    host's (argument checks, the block loop's launches and syncs, graph capture on a first
    call, reading the results back). On CUDA the three are CUDA-event times on the device's
    timeline, read once at the end of the call (recording an event adds no host sync); on the
    CPU, perf_counter around the work. Issue 18 (bench/bench_generate.py's wall split).
    """

    forwards: int = 0                 # denoising forwards (one block per sequence each)
    cache_writes: int = 0             # forwards that wrote K/V (prefill + finished blocks)
    committed_tokens: int = 0         # tokens committed over the batch, EOS fill included
    edits: int = 0                    # LLaDA2.1 editing: written tokens overwritten (T2T)
    # tokens returned over the batch: each sequence's up to and including its first EOS (what
    # tokens_per_s and tokens_per_forward count; the fill after an EOS is not an answer)
    generated_tokens: int = 0
    time_per_forward_s: float = 0.0   # mean time of one denoising step (forward + decision)
    prefill_time_s: float = 0.0       # the prefill forward (0: none ran)
    # the finished spans' cache writes, summed (0: none ran); the prefill, which cache_writes
    # counts too, is not in it
    cache_write_time_s: float = 0.0
    wall_time_s: float = 0.0          # the whole call
    peak_memory_bytes: Optional[int] = None  # CUDA only
    cuda_graph: bool = False
    graphs_captured: int = 0          # graph sets this call captured (0: it reused kept ones)
    # [forwards, moe_layers, batch]: distinct experts the block of each sequence routed to
    # (NaN where the sequence was not decoding); None when the MoE layers do not report routes.
    unique_experts: Optional[torch.Tensor] = None
    # same shape, block policies only: coreset size, and picks outside the coreset (must be 0)
    coreset_size: Optional[torch.Tensor] = None
    outside_coreset: Optional[int] = None
    # same shape as unique_experts: the most rows of the block any one expert processes
    # (balance), and the block's routed token-expert pairs (expert FLOPs / pair FLOPs)
    max_expert_load: Optional[torch.Tensor] = None
    routed_pairs: Optional[torch.Tensor] = None

    @property
    def tokens_per_forward(self) -> float:
        """generated_tokens (up to the first EOS) per denoising forward."""
        return self.generated_tokens / max(self.forwards, 1)

    @property
    def tokens_per_s(self) -> float:
        """generated_tokens (up to the first EOS) per second of the whole call."""
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

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


def _as_prompts(input_ids, attention_mask=None, pad_id=None) -> List[List[int]]:
    if attention_mask is not None:
        return _masked_prompts(input_ids, attention_mask)
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, P] or [P], got shape {tuple(input_ids.shape)}")
        rows = input_ids.tolist()
        if input_ids.shape[0] > 1 and pad_id is not None:
            for i, row in enumerate(rows):
                if row and pad_id in (row[0], row[-1]):
                    raise ValueError(
                        f"input_ids[{i}] starts or ends with the pad token {pad_id}: a padded "
                        f"[B, P] tensor needs its attention_mask (generate(model, input_ids, "
                        f"attention_mask=mask), 1 = real token), or pass the prompts unpadded as "
                        f"a list of lists of ints (any lengths)")
        return rows
    if isinstance(input_ids, Sequence) and input_ids and all(isinstance(t, int) for t in input_ids):
        return [list(input_ids)]
    if isinstance(input_ids, Sequence) and all(isinstance(p, Sequence) for p in input_ids):
        prompts = [list(p) for p in input_ids]
        if all(all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompts):
            return prompts
    raise TypeError("input_ids must be a list of lists of ints, a list of ints, or an int tensor")


def _masked_prompts(input_ids, attention_mask) -> List[List[int]]:
    """Each row's tokens where attention_mask is 1, in order (left or right padding)."""
    ids = input_ids if isinstance(input_ids, torch.Tensor) else None
    if ids is None:
        try:
            ids = torch.tensor(input_ids)
        except (TypeError, ValueError):
            raise TypeError("with attention_mask, input_ids must be an int tensor [B, P] or a "
                            "rectangular list of lists of ints") from None
    mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
    if mask is None:
        try:
            mask = torch.tensor(attention_mask)
        except (TypeError, ValueError):
            raise TypeError("attention_mask must be a tensor [B, P] of 0/1 (or bool)") from None
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"input_ids must hold integer token ids, got {ids.dtype}")
    if ids.dim() == 1:
        ids, mask = ids[None], (mask[None] if mask.dim() == 1 else mask)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, P] or [P], got shape {tuple(ids.shape)}")
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(ids.shape)}, got "
                         f"{tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (real token) only")
    keep = mask.bool().cpu()
    ids = ids.cpu()
    return [row[k].tolist() for row, k in zip(ids, keep)]


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
    # A confidence is a probability: a threshold above 1 would silently commit only the
    # quota, one below 0 everything (threshold 1.0 is the way to ask for the quota alone).
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id {mask_id} is outside the vocabulary [0, {vocab_size})")


def _special_ids(config, eos_id, mask_id):
    """(eos ids tuple, mask_id): the arguments, else the model config's, else LLaDA2.0's.
    eos_id may be an int or a list of ints (config.json often lists several): decoding stops at
    any of them, and the first is the fill token."""
    source = "eos_id" if eos_id is not None else "config.eos_token_id"
    eos_id = getattr(config, "eos_token_id", None) if eos_id is None else eos_id
    mask_id = getattr(config, "mask_token_id", None) if mask_id is None else mask_id
    eos_id = DEFAULT_EOS_ID if eos_id is None else eos_id
    ids = list(eos_id) if isinstance(eos_id, (list, tuple)) else [eos_id]
    if not ids or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
        raise ValueError(f"{source} must be an int or a non-empty list of ints, got {eos_id!r}")
    return tuple(ids), DEFAULT_MASK_ID if mask_id is None else mask_id


def _check_positions(prompts, gen_length: int, limit) -> None:
    """Prompt tokens + gen_length within max_position_embeddings (past it the model answers
    noise, or nothing)."""
    if not isinstance(limit, int) or isinstance(limit, bool):
        return
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    need = len(prompts[longest]) + gen_length
    if need > limit:
        raise ValueError(
            f"input_ids[{longest}] has {len(prompts[longest])} prompt tokens + gen_length "
            f"{gen_length} = {need} positions, more than the model's max_position_embeddings "
            f"{limit}: shorten the prompt or gen_length")


def _check_editing(editing_threshold, max_post_steps) -> None:
    """LLaDA2.1's knobs: editing_threshold None (off) or in [0, 1] (0: edit whenever the argmax
    differs, a published preset), max_post_steps an int >= 0."""
    if editing_threshold is not None and (
            isinstance(editing_threshold, bool) or not isinstance(editing_threshold, (int, float))
            or not 0 <= editing_threshold <= 1):
        raise ValueError(f"editing_threshold must be None (no token editing) or a number in "
                         f"[0, 1], got {editing_threshold!r}")
    if isinstance(max_post_steps, bool) or not isinstance(max_post_steps, int) \
            or max_post_steps < 0:
        raise ValueError(f"max_post_steps must be an int >= 0, got {max_post_steps!r}")


def quota_schedule(block_length: int, steps: int) -> List[int]:
    """Tokens to commit at least, per step: block_length // steps, remainder to the first steps."""
    base, extra = divmod(block_length, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


# ---------------------------------------------------------------------------------------------
# The decision of one step (device ops only)


def pick_tokens(logits, temperature: float, top_k: Optional[int], top_p: Optional[float],
                generator=None):
    """Candidate token and its probability per row of logits [..., V] (any float dtype: the
    arithmetic is fp32, which holds bf16 and fp16 values exactly), in the order of
    the published LLaDA2 sampler: the temperature divides the logits first, then the top-k
    and top-p filters, then one multinomial draw per row from the softmax of what is left
    (its probability is the confidence). Temperature 0 takes the argmax, with the unfiltered
    softmax as confidence: that is what users mean by 0 (the published generate() has no
    separate greedy mode in every release; with temperature 1 and the same seed this draws
    exactly what the published sampler draws). Temperature 0 runs pick.greedy_pick (one or
    two launches on CUDA, reading fp32 / fp16 / bf16 logits as they are, other dtypes upcast to
    fp32 first; its rule for rows with NaN or infinite logits)."""
    if temperature <= 0:  # one pass over the logits in their dtype (pick.greedy_pick)
        if logits.dtype not in KERNEL_FLOATS:
            logits = logits.float()
        return greedy_pick(logits)
    logits = logits.float()
    if temperature != 1:
        logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = sorted_logits.softmax(-1).cumsum(-1) > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    tok = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    return tok, probs.gather(-1, tok[..., None]).squeeze(-1)


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


def editing_decision(tok, conf, block, masked, written, threshold: float,
                     editing_threshold: float):
    """LLaDA2.1's decision for one step (../shared/docs/llada2-family.md, "Decoding"): device
    ops only. tok, conf, block [B, L] (candidate, its probability, current tokens); masked
    [B, L] bool: masked positions that may be committed; written [B, L] bool: already-written,
    non-prompt positions that may be edited. Returns (commit, edit) [B, L] bool:
    commit = every masked position with conf > threshold, else the single most confident one
    (ties: the lower position); edit = written positions whose candidate differs from their
    token with conf > editing_threshold (overwritten, never re-masked)."""
    commit = commit_mask(conf, masked, threshold, 1)
    edit = written & (tok != block) & (conf > editing_threshold)
    return commit, edit


def _edit_step(buf: "_StepBuffers", tok, conf, mask_id: int, s: "_Sampling") -> None:
    """Apply editing_decision to the step buffers and settle the sequences finished with the
    block: no mask left, and either max_post_steps edit-only steps done or an edit-only step
    that edited nothing. Device ops only."""
    live = buf.running & ~buf.settled
    masked = (buf.block == mask_id) & buf.current & live
    written = buf.generated & live & (buf.block != mask_id)
    commit, edit = editing_decision(tok, conf, buf.block, masked, written, s.threshold,
                                    s.editing_threshold)
    post = live & ~masked.any(-1, keepdim=True)  # this was an edit-only step
    buf.block.copy_(torch.where(commit | edit, tok, buf.block))
    buf.committed.add_(commit.sum())
    buf.edits.add_(edit.sum())
    buf.post_steps.add_(post.long())
    left = ((buf.block == mask_id) & buf.current).any(-1, keepdim=True)
    quiet = post & ~edit.any(-1, keepdim=True)
    buf.settled.logical_or_(live & ~left & (quiet | (buf.post_steps >= s.max_post_steps)))


# ---------------------------------------------------------------------------------------------
# Routing statistics


def route_stats(modules, rows, unique_out, coreset_out, outside_out, load_out=None,
                pairs_out=None):
    """Write unique experts (and coreset size / outside picks, the largest expert load and the
    routed pairs) of the `rows` ([B, L] bool) of each MoE layer's last forward into [layers, B]
    buffers. Device ops only.

    The layers' routes are stacked first, so a step launches a fixed handful of kernels
    whatever the layer count (layer by layer, ~20 small launches x 19 layers: issue 18 found
    LLaDA2.0-mini's graphed step ~1.3x its bare forward with them). The coreset is averaged
    over the routing windows that hold those rows; generate's forwards start on a window
    boundary, so window j holds rows [j * block_size, (j + 1) * block_size). load_out /
    pairs_out (optional): the most rows any expert takes, and the routed (row, expert) pairs."""
    routes = [m.last_route for m in modules]
    E = max(_num_experts(m, r) for m, r in zip(modules, routes))
    extra = routes[0].topk_ids.shape[-2] - rows.shape[-1]
    if extra > 0:  # use_cache=False: the forward routed every earlier column too
        rows = torch.nn.functional.pad(rows, (extra, 0))
    ids = torch.where(rows[..., None], torch.stack([r.topk_ids for r in routes]), -1)
    n, B = ids.shape[:2]
    load = expert_load(ids.flatten(0, 1), E).view(n, B, E)
    hit = load > 0
    unique_out.copy_(hit.sum(-1))
    if load_out is not None:
        load_out.copy_(load.max(-1).values)
        pairs_out.copy_(load.sum(-1))
    if coreset_out is None:
        return
    groups = {}  # layers with a coreset, by (window rows, experts): stacked together
    for i, (m, r) in enumerate(zip(modules, routes)):
        if r.coreset is not None:
            size = getattr(getattr(m, "policy", None), "block_size", None) or rows.shape[1]
            groups.setdefault((size, r.coreset.shape[-1]), []).append(i)
    for (size, _), layers in groups.items():
        _coreset_stats([routes[i].coreset for i in layers], layers, _windows_held(rows, size,
                       routes[layers[0]].coreset.shape[1]), hit, coreset_out, outside_out)


def _windows_held(rows, size: int, windows: int):
    """[B, windows] bool: the routing windows of `size` rows that hold any of `rows` [B, L]."""
    B = rows.shape[0]
    padded = torch.zeros(B, windows * size, dtype=torch.bool, device=rows.device)
    padded[:, : rows.shape[1]] = rows
    return padded.view(B, windows, size).any(-1)


def _coreset_stats(coresets, layers, covers, hit, coreset_out, outside_out) -> None:
    """Coreset size (mean over the held windows) and picks outside it, of the `layers` whose
    coresets [B, windows, E] are given, into rows `layers` of coreset_out / outside_out."""
    cs = torch.stack(coresets)  # [g, B, windows, E]
    sizes = (cs.sum(-1).float() * covers).sum(-1) / covers.sum(-1).clamp(min=1)
    every = layers == list(range(hit.shape[0]))
    picked = hit if every else torch.stack([hit[i] for i in layers])
    outside = (picked & ~(cs & covers[..., None]).any(2)).sum(-1)
    if every:
        coreset_out.copy_(sizes)
        outside_out.copy_(outside)
        return
    for j, i in enumerate(layers):  # layers under different policies: rare, one copy each
        coreset_out[i] = sizes[j]
        outside_out[i] = outside[j]


def _num_experts(module, route) -> int:
    if route.coreset is not None:
        return route.coreset.shape[-1]
    cfg = getattr(module, "router_cfg", None) or getattr(getattr(module, "gate", None), "config", None)
    return cfg.num_experts


class RouteRecorder:
    """Routing statistics of every denoising forward, [forwards, layers, B], written by the step
    on the device (capturable): unique experts, coreset size, picks outside the coreset, the
    largest expert load and the routed token-expert pairs of the block. NaN / 0
    where a sequence was not decoding."""

    def __init__(self, modules: list, max_forwards: int, batch: int, device):
        self.modules = modules
        shape = (max_forwards, len(modules), batch)
        self.unique = torch.full(shape, float("nan"), device=device)
        self.coreset = torch.full_like(self.unique, float("nan"))
        self.outside = torch.zeros(shape, dtype=torch.long, device=device)
        self.load = torch.full_like(self.unique, float("nan"))
        self.pairs = torch.full_like(self.unique, float("nan"))
        self.has_coreset = False  # set by record(): a layer routed with a block policy

    def buffers(self) -> tuple:
        return self.unique, self.coreset, self.outside, self.load, self.pairs

    def reset(self) -> None:
        """As allocated (a kept recorder serving another generate call)."""
        for buffer in (self.unique, self.coreset, self.load, self.pairs):
            buffer.fill_(float("nan"))
        self.outside.zero_()

    def record(self, rows, running, forward_index) -> None:
        """Row `forward_index` from the layers' last routes over `rows` ([B, L] bool: the block
        being decoded)."""
        n, B = self.unique.shape[1:]
        device = self.unique.device
        self.has_coreset = any(m.last_route.coreset is not None for m in self.modules)
        u = torch.empty(n, B, device=device)
        load, pairs = torch.empty(n, B, device=device), torch.empty(n, B, device=device)
        c = torch.full((n, B), float("nan"), device=device) if self.has_coreset else None
        o = torch.zeros(n, B, dtype=torch.long, device=device) if self.has_coreset else None
        route_stats(self.modules, rows, u, c, o, load, pairs)
        keep, at = running[:, 0], forward_index[None]
        for buffer, value in ((self.unique, u), (self.load, load), (self.pairs, pairs)):
            buffer.index_copy_(0, at, torch.where(keep, value, float("nan"))[None])
        if self.has_coreset:
            self.coreset.index_copy_(0, at, torch.where(keep, c, float("nan"))[None])
            self.outside.index_copy_(0, at, (o * keep)[None])

    def fill(self, st: "GenerationStats") -> None:
        """The first st.forwards rows into st (one host sync)."""
        n = st.forwards
        st.unique_experts = self.unique[:n].cpu()
        st.max_expert_load, st.routed_pairs = self.load[:n].cpu(), self.pairs[:n].cpu()
        if self.has_coreset:
            st.coreset_size = self.coreset[:n].cpu()
            st.outside_coreset = int(self.outside[:n].sum())


# ---------------------------------------------------------------------------------------------
# Decoding state


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


@dataclass
class _Canvas:
    """Every sequence left-padded by whole spans, so that routing windows and diffusion blocks
    fall on the same columns for all of them (docs/routing.md). x holds the tokens; positions
    are each sequence's own."""

    block_length: int
    span: int                  # columns of one step forward: max(block_length, routing window)
    gen_length: int
    starts: List[int]          # canvas column of each sequence's first generated token
    last_block: List[int]      # the last global block of each sequence
    first: int                 # the first global block that holds a masked position
    total: int                 # blocks on the canvas (whole spans of columns)
    x: torch.Tensor            # [B, total * block_length] token ids
    positions: torch.Tensor    # [B, total * block_length] own positions (< 0 on padding)
    valid: torch.Tensor        # positions >= 0
    gen_start: torch.Tensor    # starts, on the device
    # on the device as well, made once per call: a tensor built from a Python list is a
    # blocking copy on CUDA (a host sync), once per block if the loop made them
    last: torch.Tensor         # [B] last_block
    columns: torch.Tensor      # [total * block_length] column indices
    eos: torch.Tensor          # [n] every id that ends a sequence (the first is the fill)


def _canvas(prompts, bl: int, span: int, G: int, mask_id: int, eos_ids: tuple,
            device) -> _Canvas:
    own_first = [len(p) // bl * bl for p in prompts]  # position of each one's first block
    latest = max(own_first)
    # Padding in whole spans keeps every sequence's windows and blocks on shared columns; with
    # span == block_length this is the published layout (all decode global block `first` first).
    offsets = [-(-(latest - f) // span) * span for f in own_first]
    first = min(f + o for f, o in zip(own_first, offsets)) // bl
    ends = [-(-(o + len(p) + G) // bl) for o, p in zip(offsets, prompts)]
    last_block = [e - 1 for e in ends]
    total = -(-max(ends) * bl // span) * span // bl
    x = torch.full((len(prompts), total * bl), mask_id, dtype=torch.long)
    for i, (p, o) in enumerate(zip(prompts, offsets)):
        x[i, :o] = eos_ids[0]
        x[i, o: o + len(p)] = torch.tensor(p)
    positions = (torch.arange(total * bl)[None] - torch.tensor(offsets)[:, None]).to(device)
    starts = [o + len(p) for o, p in zip(offsets, prompts)]
    return _Canvas(bl, span, G, starts, last_block, first, total, x.to(device), positions,
                   positions >= 0, torch.tensor(starts, device=device),
                   torch.tensor(last_block, device=device),
                   torch.arange(total * bl, device=device), torch.tensor(eos_ids, device=device))


def _routing_span(model, bl: int) -> int:
    """max(block_length, the routing window of the model's block policy): the rows of one
    step forward, so that a window is always held whole up to the block being decoded and the
    cache only ever holds closed windows. A ValueError names block_length when it neither
    divides nor is a multiple of the window."""
    policies = [getattr(m, "policy", None) or getattr(m, "block_policy", None)
                for m in moe_layers(model)]  # patched blocks; an unpatched LLaDA2.2 gate
    windows = {p.block_size for p in policies if p is not None and p.is_block}
    span = bl
    for w in windows:
        if w % bl and bl % w:
            raise ValueError(f"block_length ({bl}) must divide or be a multiple of the routing "
                             f"window ({w}, the policy's block_size)")
        span = max(span, w)
    return span


def _new_cache(model, canvas: _Canvas, static: bool):
    # On CUDA the cache is static (fixed shapes) graphed or not, so that a graphed step and an
    # eager one run the same attention and give the same tokens.
    return model.new_cache(canvas.x.shape[0], canvas.total * canvas.block_length, static=static,
                           scratch=max(64, canvas.span))


def _prefill(model, canvas: _Canvas, cache, st: "GenerationStats", timer: "_Timer") -> None:
    """Fill the empty `cache` with the prompts' whole spans before block `first` (closed
    windows only: the open one is recomputed by every step until its last block is decoded)."""
    bl = canvas.block_length
    end = canvas.first * bl // canvas.span * canvas.span
    if end > 0:
        with timer:
            model(canvas.x[:, :end], canvas.positions[:, :end], past_key_values=cache,
                  attention_mask=canvas.valid[:, :end], block_length=bl, write_cache=True,
                  return_logits=False)
        st.cache_writes += 1


@dataclass
class _StepBuffers:
    """What one denoising step reads and writes: fixed tensors, so a CUDA graph can replay it.
    The step forward covers one span of columns: the routing window (or the diffusion block,
    if longer) that holds the block being decoded.

    Filled with valid values: the graph's warm-up steps run before the first block is loaded
    (garbage token ids there would index the embedding out of bounds)."""

    block: torch.Tensor          # [B, span] tokens of the span
    block_pos: torch.Tensor      # [B, span] their positions
    held: torch.Tensor           # [B, span] real rows up to the block's end (the rest: padding
                                 # or later blocks, which neither vote nor are attended to)
    current: torch.Tensor        # [B, span] the block being decoded
    running: torch.Tensor        # [B, 1] sequences still decoding
    quota: torch.Tensor          # () tokens to commit at least this step
    committed: torch.Tensor      # () tokens committed so far
    forward_index: torch.Tensor  # () row of the routing statistics
    left: torch.Tensor           # () bool: a position of the block is still masked (the step
                                 # sets it, so the host's one read per step launches nothing)
    # LLaDA2.1 editing only (left as allocated otherwise):
    generated: torch.Tensor      # [B, span] the block's non-prompt columns (editable)
    settled: torch.Tensor        # [B, 1] sequences finished with the block
    post_steps: torch.Tensor     # [B, 1] edit-only steps done on the block
    edits: torch.Tensor          # () tokens overwritten so far
    end: int = 0                 # canvas columns up to the span's end (the uncached step)

    @classmethod
    def allocate(cls, B: int, span: int, mask_id: int, device) -> "_StepBuffers":
        zeros = lambda *shape, **kw: torch.zeros(*shape, dtype=torch.long, device=device, **kw)  # noqa: E731
        flags = lambda: torch.ones(B, span, dtype=torch.bool, device=device)  # noqa: E731
        return cls(torch.full((B, span), mask_id, dtype=torch.long, device=device),
                   zeros(B, span), flags(), flags(),
                   torch.zeros(B, 1, dtype=torch.bool, device=device), zeros(()), zeros(()),
                   zeros(()), torch.ones((), dtype=torch.bool, device=device), flags(),
                   torch.zeros(B, 1, dtype=torch.bool, device=device), zeros(B, 1), zeros(()))

    def tensors(self) -> tuple:
        """What a step writes (restored after a graph capture's warm-up steps)."""
        return (self.block, self.committed, self.forward_index, self.left, self.settled,
                self.post_steps, self.edits)

    def reset(self) -> None:
        """The counters as allocated (kept buffers serving another call; the rest is loaded
        per block)."""
        self.committed.zero_()
        self.forward_index.zero_()
        self.edits.zero_()


@dataclass(frozen=True)
class _Sampling:
    threshold: float
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    generator: object
    editing_threshold: Optional[float] = None  # None: LLaDA2.0 (no token editing)
    max_post_steps: int = 16


@dataclass
class _Decode:
    """The explicit state every decoding stage reads."""

    model: torch.nn.Module
    canvas: _Canvas
    buffers: _StepBuffers
    sampling: _Sampling
    cache: object                      # None: recompute every earlier block (use_cache=False)
    recorder: Optional[RouteRecorder]  # None: no routing statistics
    mask_id: int
    steps: int


# ---------------------------------------------------------------------------------------------
# The step, its graph, the block loop


def denoise_step(d: _Decode) -> None:
    """One denoising forward and its commit decision: device ops only, no host sync."""
    buf, bl, s = d.buffers, d.canvas.block_length, d.sampling
    if d.cache is not None:
        logits = d.model(buf.block, buf.block_pos, past_key_values=d.cache,
                         attention_mask=buf.held, block_length=bl, float_logits=False).logits
    else:  # recompute every earlier block, as the published generate does
        start, c = buf.end - d.canvas.span, d.canvas
        ids = torch.cat((c.x[:, :start], buf.block), dim=1)
        held = torch.cat((c.valid[:, :start], buf.held), dim=1)
        logits = d.model(ids, c.positions[:, :buf.end], attention_mask=held,
                         block_length=bl, float_logits=False).logits[:, start:]
    tok, conf = pick_tokens(logits, s.temperature, s.top_k, s.top_p, s.generator)
    if s.editing_threshold is not None:
        _edit_step(buf, tok, conf, d.mask_id, s)
    else:
        commit = commit_mask(conf, _masked(d), s.threshold, buf.quota)
        buf.block.copy_(torch.where(commit, tok, buf.block))
        buf.committed.add_(commit.sum())
    if d.recorder is not None:
        d.recorder.record(buf.current, buf.running, buf.forward_index)
    buf.forward_index.add_(1)
    buf.left.copy_(_block_open(d))


def _block_open(d: _Decode):
    """() bool on the device: does a running sequence still need a step on this block? Without
    editing: is anything of it masked; with editing: is a sequence not yet settled."""
    buf = d.buffers
    if d.sampling.editing_threshold is not None:
        return (buf.running & ~buf.settled).any()
    return _masked(d).any()


def _masked(d: _Decode):
    """[B, span] bool: the block's positions still masked in the running sequences."""
    buf = d.buffers
    return (buf.block == d.mask_id) & buf.running & buf.current


def _write_span(d: _Decode) -> None:
    """The eager cache write: the span's forward appending its K/V. held is the span's real
    rows here (the block closes its span)."""
    buf = d.buffers
    d.model(buf.block, buf.block_pos, past_key_values=d.cache, attention_mask=buf.held,
            block_length=d.canvas.block_length, write_cache=True, return_logits=False)


def _span_forward(d: _Decode) -> None:
    """The cache write's forward without the write: its K/V stay in the static cache's scratch
    rows (BlockKVCache.append_scratch moves them). What the write graph holds."""
    buf = d.buffers
    d.model(buf.block, buf.block_pos, past_key_values=d.cache, attention_mask=buf.held,
            block_length=d.canvas.block_length, return_logits=False)


@dataclass
class _Runner:
    """How the block loop runs a denoising step and a span's cache write."""

    step: Callable[[], None]
    write_span: Callable[[], None]


@dataclass
class _Graphs:
    """What graph_cache keeps for one decoding layout (graphs.graph_key): the tensors the
    graphs read, refilled by each call, and the replays of the step and of the span forward."""

    buffers: _StepBuffers
    cache: object
    recorder: Optional[RouteRecorder]
    step: Callable[[], None]
    span_forward: Callable[[], None]

    @classmethod
    def capture(cls, d: _Decode) -> "_Graphs":
        records = d.recorder.buffers() if d.recorder is not None else ()
        step = capture(functools.partial(denoise_step, d), (*d.buffers.tensors(), *records))
        span_forward = capture(functools.partial(_span_forward, d))
        return cls(d.buffers, d.cache, d.recorder, step, span_forward)

    def reset(self) -> None:
        """Empty cache, counters and records, as freshly allocated (another call's turn)."""
        self.cache.clear()
        self.buffers.reset()
        if self.recorder is not None:
            self.recorder.reset()

    def runner(self) -> _Runner:
        def write_span():
            self.span_forward()
            self.cache.append_scratch(self.buffers.held)
        return _Runner(self.step, write_span)


def _denoise_block(d: _Decode, b: int, running, step, timer, st) -> None:
    """Up to `steps` denoising steps on global block b, until nothing in it is masked.
    running: [B] bool on the device, the sequences decoding it."""
    buf, c, bl = d.buffers, d.canvas, d.canvas.block_length
    lo = b * bl // c.span * c.span  # the span that holds block b
    hi = lo + c.span
    columns = c.columns[lo:hi][None]
    buf.block.copy_(c.x[:, lo:hi])
    buf.block_pos.copy_(c.positions[:, lo:hi])
    buf.held.copy_(c.valid[:, lo:hi] & (columns < (b + 1) * bl))
    buf.current.copy_((columns >= b * bl) & (columns < (b + 1) * bl))
    buf.running.copy_(running[:, None])
    buf.end = hi
    if d.sampling.editing_threshold is not None:
        _start_editing(d, columns)
    buf.left.copy_(_block_open(d))
    for quota in quota_schedule(bl, d.steps):
        if not bool(buf.left):  # the one host sync of a step (the step before computed it)
            break
        buf.quota.fill_(quota)
        with timer:
            step()
        st.forwards += 1
    c.x[:, lo:hi] = buf.block


def _start_editing(d: _Decode, columns) -> None:
    """Editing state for a new block: its generated columns, no post step yet, and a sequence
    with nothing masked in it (a prompt-only block of a batch neighbour) settled at once."""
    buf = d.buffers
    buf.generated.copy_(buf.current & (columns >= d.canvas.gen_start[:, None]))
    buf.post_steps.zero_()
    masked = ((buf.block == d.mask_id) & buf.current).any(-1, keepdim=True)
    buf.settled.copy_(~(masked & buf.running))


def _cache_span(d: _Decode, b: int, write_span, st, timer: "_Timer") -> None:
    """After block b: once it closes its span, the span's K/V into the cache (whole windows)."""
    if (b + 1) * d.canvas.block_length % d.canvas.span:
        return
    with timer:
        write_span()
    st.cache_writes += 1


def _finished(d: _Decode, b: int, done) -> List[bool]:
    """Mark sequences done after block b (done: [B] bool on the device, updated in place): EOS
    among their generated tokens (checked once the block is done, as published) or their last
    block reached. Returns done as a list: one host sync."""
    c = d.canvas
    hi = (b + 1) * c.block_length
    seen = torch.isin(c.x, c.eos) & (c.columns >= c.gen_start[:, None]) & (c.columns < hi)
    done.logical_or_(seen.any(1) | (c.last <= b))
    return done.tolist()


def _run_blocks(d: _Decode, run: _Runner, st, on_block, timers: "_Timers") -> None:
    """Decode block by block from `first` until every sequence is done. `done` lives on the
    device (the next block's running flags are computed there) and is read once per block."""
    c = d.canvas
    done = torch.zeros(c.x.shape[0], dtype=torch.bool, device=c.x.device)
    done_now = [False] * c.x.shape[0]
    for b in range(c.first, c.total):
        if all(done_now[i] or b > c.last_block[i] for i in range(len(done_now))):
            break
        _denoise_block(d, b, ~done & (c.last >= b), run.step, timers.step, st)
        done_now = _finished(d, b, done)
        if on_block is not None:
            on_block(b - c.first + 1, c.total - c.first)
        if d.cache is not None and not all(done_now):
            _cache_span(d, b, run.write_span, st, timers.cache_write)


def _tokens(c: _Canvas, eos_ids) -> List[List[int]]:
    """Each sequence's generated tokens, cut after the first EOS (any of eos_ids)."""
    eos_ids = set(eos_ids)
    tokens = []
    x = c.x.cpu()  # one copy: a .tolist() per sequence of a CUDA tensor is a host sync each
    for i, start in enumerate(c.starts):
        out = x[i, start: start + c.gen_length].tolist()
        cut = next((j for j, t in enumerate(out) if t in eos_ids), None)
        tokens.append(out if cut is None else out[: cut + 1])
    return tokens


# ---------------------------------------------------------------------------------------------
# generate


def _setup(model, prompts, *, gen_length, block_length, steps, sampling, mask_id, eos_ids,
           use_cache, stats, graph, st, timers) -> tuple:
    """(_Decode, _Runner) of one generate() call: canvas, prefilled cache (timed by
    timers.prefill), step buffers and routing recorder, and how to run a step. With `graph`,
    the tensors and graphs graph_cache kept for this layout are refilled and replayed, or
    captured and kept."""
    device = next(model.parameters()).device
    span = _routing_span(model, block_length)
    canvas = _canvas(prompts, block_length, span, gen_length, mask_id, eos_ids, device)
    B = len(prompts)
    moe = moe_layers(model) if stats else []
    key = graph_key(model, batch=B, span=span, capacity=canvas.total * block_length,
                    block_length=block_length, steps=steps, mask_id=mask_id, stats=bool(moe),
                    sampling=(sampling.threshold, sampling.temperature, sampling.top_k,
                              sampling.top_p, sampling.editing_threshold,
                              sampling.max_post_steps)) if graph else None
    kept = graph_cache.get(key, model) if graph else None
    if kept is not None:
        kept.reset()
        buffers, cache, recorder = kept.buffers, kept.cache, kept.recorder
    else:
        buffers = _StepBuffers.allocate(B, span, mask_id, device)
        cache = _new_cache(model, canvas, graph or device.type == "cuda") if use_cache else None
        # Rows for every step of every block: a size fixed by the layout, so a kept recorder
        # serves any prompt lengths of that layout.
        recorder = RouteRecorder(moe, canvas.total * steps, B, device) if moe else None
    if cache is not None:
        _prefill(model, canvas, cache, st, timers.prefill)
    d = _Decode(model, canvas, buffers, sampling, cache, recorder, mask_id, steps)
    if not graph:
        return d, _Runner(functools.partial(denoise_step, d), functools.partial(_write_span, d))
    if kept is None:
        kept = _Graphs.capture(d)
        graph_cache.put(key, model, kept)
        st.graphs_captured += 1
    return d, kept.runner()


@torch.no_grad()
def generate(model, input_ids: Union[torch.Tensor, List[List[int]], List[int]],
             gen_length: int = 256, block_length: int = 32, steps: int = 32,
             threshold: float = 0.95, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_id: Union[int, Sequence[int], None] = None,
             mask_id: Optional[int] = None, use_cache: bool = True,
             cuda_graph: Optional[bool] = None, stats: bool = True, generator=None,
             on_block: Optional[Callable[[int, int], None]] = None,
             attention_mask: Optional[torch.Tensor] = None,
             editing_threshold: Optional[float] = None,
             max_post_steps: int = 16) -> GenerationResult:
    """Decode `gen_length` tokens after each prompt with LLaDA2 block diffusion.

    model: LLaDA2MoeModelLM (patched or not). input_ids: prompts, a list of lists of ints (any
    lengths) or an int tensor [B, P]. A padded tensor takes its attention_mask [B, P] as
    transformers gives it (1 = real token, 0 = padding, left or right): each row's real tokens
    are its prompt, in order, and decode exactly as the unpadded list would. Without a mask, a
    2-D tensor of two or more rows in which some row starts or ends with config.pad_token_id is
    refused (ValueError naming attention_mask): it looks padded, and pads would be read as text
    (for LLaDA2.0-mini pad == EOS). temperature 0 takes the argmax; above 0 samples (the
    temperature divides the logits, then top_k and top_p filter: pick_tokens). eos_id /
    mask_id default to the model config's (else LLaDA2.0's);
    eos_id may be an int or a list of ints: a sequence ends with the block that holds any of
    them, its tokens are cut after the first, and the first id is the fill token. A prompt
    whose length plus gen_length exceeds config.max_position_embeddings is a ValueError.
    use_cache=False recomputes every earlier block at each step (the published, slow way).
    cuda_graph: None = on for patched models on CUDA; the graphs are kept between calls
    (graphs.graph_cache: a later call with the same batch size, lengths, sampling and policy
    captures nothing; `dmoe_triton.graphs.clear_graph_cache()` frees them). stats: record
    unique experts, coreset sizes and picks outside the coreset of every layer at every step
    (GenerationStats.unique_experts ...): on by default, a fixed handful of small kernels per
    step whatever the layer count; stats=False drops them. on_block(done, total) is called
    after each block (progress bars). Returns tokens per sequence, cut after the first EOS.

    editing_threshold: None (default) decodes as LLaDA2.0. A number in [0, 1] turns on LLaDA2.1
    token editing (../shared/docs/llada2-family.md): each step commits every masked position
    of the block with confidence > threshold (else the single most confident one) and
    overwrites every written, non-prompt position of the block whose candidate differs from its
    token with confidence > editing_threshold; once the block has no mask, up to
    `max_post_steps` (int >= 0) edit-only steps follow, ending early after one that edits
    nothing. `steps` does not bound a block in this mode. stats.edits counts the overwrites.
    A ValueError names editing_threshold outside [0, 1] or max_post_steps < 0. The checkpoint's
    generation_config.json values are what the CLI passes (cli.generation_defaults).
    """
    start_time = time.perf_counter()
    eos_ids, mask_id = _special_ids(model.config, eos_id, mask_id)
    prompts = _as_prompts(input_ids, attention_mask, getattr(model.config, "pad_token_id", None))
    _check_args(prompts, model.config.vocab_size, gen_length, block_length, steps, threshold,
                temperature, top_k, top_p, mask_id)
    _check_editing(editing_threshold, max_post_steps)
    _check_positions(prompts, gen_length, getattr(model.config, "max_position_embeddings", None))
    device = next(model.parameters()).device
    graph = _wants_graph(model, device, cuda_graph, temperature, generator) and use_cache
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    st = GenerationStats(cuda_graph=graph)
    timers = _Timers.on(device)
    d, run = _setup(model, prompts, gen_length=gen_length, block_length=block_length,
                    # as published (minimal_topk = 1); editing: every mask step commits at
                    # least one of the block's masks, then at most max_post_steps edit-only steps
                    steps=min(steps, gen_length) if editing_threshold is None
                    else block_length + max_post_steps,
                    sampling=_Sampling(threshold, temperature, top_k, top_p, generator,
                                       editing_threshold, max_post_steps),
                    mask_id=mask_id, eos_ids=eos_ids, use_cache=use_cache, stats=stats,
                    graph=graph, st=st, timers=timers)
    _run_blocks(d, run, st, on_block, timers)
    tokens = _tokens(d.canvas, eos_ids)
    st.generated_tokens = sum(map(len, tokens))
    _finish_stats(st, d, timers, start_time)
    return GenerationResult(tokens, st)


def _finish_stats(st: GenerationStats, d: _Decode, timers: "_Timers", start_time: float) -> None:
    st.committed_tokens = int(d.buffers.committed)
    st.edits = int(d.buffers.edits)
    timers.fill(st)
    if d.recorder is not None:
        d.recorder.fill(st)
    device = d.buffers.block.device
    if device.type == "cuda":
        st.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    st.wall_time_s = time.perf_counter() - start_time


class _Timer:
    """Times of the work run inside `with timer:`, in seconds: CUDA events on the GPU (recording
    one adds no host sync; read after _Timers.fill's one synchronize), perf_counter elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __enter__(self):
        self.marks.append([self._now(), None])

    def __exit__(self, *exc):
        self.marks[-1][1] = self._now()

    def total(self) -> float:
        if self.cuda:
            return sum(a.elapsed_time(b) for a, b in self.marks) / 1e3
        return sum(b - a for a, b in self.marks)

    def mean(self) -> float:
        return self.total() / len(self.marks) if self.marks else 0.0


@dataclass
class _Timers:
    """One generate() call's timers: the denoising steps, the prefill, the span cache writes."""

    step: _Timer
    prefill: _Timer
    cache_write: _Timer

    @classmethod
    def on(cls, device) -> "_Timers":
        return cls(_Timer(device), _Timer(device), _Timer(device))

    def fill(self, st: GenerationStats) -> None:
        """time_per_forward_s, prefill_time_s, cache_write_time_s into st (one host sync)."""
        if self.step.cuda:
            torch.cuda.synchronize()
        st.time_per_forward_s = self.step.mean()
        st.prefill_time_s = self.prefill.total()
        st.cache_write_time_s = self.cache_write.total()


class _WarmedUp(Exception):
    """Raised from on_block to end warm_up's call after its first block."""


def warm_up(model, input_ids, **generate_kwargs) -> None:
    """One `generate` call of this layout (same arguments as the call to come), stopped after
    its first block: it compiles the kernels and captures the graphs that the later call then
    finds in graphs.graph_cache, so that call's time is steady state (the CLI and
    bench_generate.py time this way). on_block is taken by the warm-up."""
    def stop(done, total):
        raise _WarmedUp
    try:
        generate(model, input_ids, on_block=stop, **generate_kwargs)
    except _WarmedUp:
        pass
