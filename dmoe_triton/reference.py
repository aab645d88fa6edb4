"""The PyTorch reference: docs/routing.md and the expert MLP, in plain code.

Short and obvious on purpose: the rules read as tensor ops (loops only over sequences and
blocks), no performance tricks.
Every function computes in the dtype of its inputs (pass float64 for a high-precision oracle).
The Triton kernels are tested against these functions.
"""
from __future__ import annotations

import torch

from .config import RouterConfig, RoutingPolicy


def sort_desc(values: torch.Tensor) -> torch.Tensor:
    """Indices that sort the last dim descending; ties go to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def scores(logits: torch.Tensor, expert_bias: torch.Tensor):
    """s weighs, r ranks. A NaN in r is ranked as -inf; its token is flagged `bad`."""
    s = torch.sigmoid(logits)
    r = s + expert_bias.to(s.dtype)
    bad = torch.isnan(r).any(dim=-1)
    r = torch.where(torch.isnan(r), torch.full_like(r, float("-inf")), r)
    return s, r, bad


def group_limited_topk(r: torch.Tensor, candidates: torch.Tensor, cfg: RouterConfig, top_k: int):
    """Spec step 2 for rows of r [N, E] with candidate mask [N, E]: ids [N, top_k], -1 = empty."""
    N, E = r.shape
    G, size = cfg.n_group, cfg.group_size
    neg_inf = torch.tensor(float("-inf"), dtype=r.dtype)
    masked = torch.where(candidates, r, neg_inf)
    top = torch.sort(masked.view(N, G, size), dim=-1, descending=True).values
    count = candidates.view(N, G, size).sum(dim=-1)
    # Rank groups by (class, score): class 2 = two or more candidates, scored by the sum of
    # its two largest values; class 1 = one candidate, scored by it; class 0 = none.
    group_class = (count >= 2).long() + (count >= 1).long()
    score = torch.where(count >= 2, top[..., 0] + top[..., 1],  # RouterConfig: size >= 2
                        torch.where(count == 1, top[..., 0], torch.zeros_like(top[..., 0])))
    # Class first, then score, then the lower group: a stable sort by score, then a stable
    # sort of that order by class (ties keep their order: by score, then by group index).
    by_score = sort_desc(score)
    ranked = torch.gather(by_score, 1, sort_desc(torch.gather(group_class, 1, by_score)))
    kept_group = torch.zeros(N, G, dtype=torch.bool).scatter_(1, ranked[:, :cfg.topk_group], True)
    row = torch.where(kept_group.repeat_interleave(size, dim=1), masked, neg_inf)
    order = sort_desc(row)[:, :top_k]
    return torch.where(row.gather(1, order) == float("-inf"), torch.full_like(order, -1), order)


def scaled_weights(s: torch.Tensor, ids: torch.Tensor, bad: torch.Tensor, scale: float):
    """Spec step 3: unbiased sigmoid of the filled slots, renormalised (not with one slot: every
    LLaDA2 gate normalises only when top_k > 1), scaled; NaN for bad rows."""
    filled = ids >= 0
    w = torch.where(filled, torch.gather(s, -1, ids.clamp(min=0)), torch.zeros_like(s[..., :1]))
    if ids.shape[-1] > 1:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    w = w * scale
    return torch.where(bad[..., None], torch.full_like(w, float("nan")), w)


def block_votes(r: torch.Tensor, top_k: int) -> torch.Tensor:
    """dMoE steps 1-3 for one block's real rows r [T, E]: normalised votes [E]."""
    picks = sort_desc(r)[:, :top_k]  # each row's own top-k (ties: lower index)
    picked = r.gather(1, picks)
    # A -inf pick (only from NaN scores) is an empty slot and casts no vote.
    kept = torch.zeros_like(r).scatter_(1, picks, torch.where(torch.isinf(picked),
                                                              torch.zeros_like(picked), picked))
    votes = kept.sum(dim=0)
    return votes / (votes.sum() + 1e-20)


def block_coreset(votes: torch.Tensor, policy: RoutingPolicy) -> torch.Tensor:
    """dMoE steps 4-5 (or the DES-vote fixed top-size) for one block: bool mask [E]."""
    E = votes.numel()
    order = sort_desc(votes)
    coreset = torch.zeros(E, dtype=torch.bool)
    if policy.kind == "des_vote":
        coreset[order[: policy.size]] = True
        return coreset
    cum = torch.cumsum(votes[order], dim=0)
    # In exact arithmetic every normalised cumulative sum is <= 1: top_p = 1 keeps every expert
    # (= token routing), whatever the rounding of the tail.
    keep = (cum <= policy.top_p) | (policy.top_p >= 1.0)
    passed = torch.nonzero(~keep)
    if len(passed):
        keep[passed[0, 0]] = True  # the first expert that passes top_p
    keep[0] = True
    if int(keep.sum()) < policy.guard:
        keep = torch.arange(E) < policy.guard
    coreset[order[keep]] = True
    return coreset


def window_coreset(r: torch.Tensor, policy: RoutingPolicy, top_k: int) -> torch.Tensor:
    """The coreset [E] bool of one window from its real rows' scores r [T, E]: dMoE / DES-vote
    from the normalised votes; capacity (LLaDA2.2) the `expert_capacity` experts with the
    largest maximum of r over the rows, ties to the lower index (a NaN score ranks -inf)."""
    if policy.kind == "capacity":
        coreset = torch.zeros(r.shape[1], dtype=torch.bool)
        coreset[sort_desc(r.max(dim=0).values)[: policy.expert_capacity]] = True
        return coreset
    return block_coreset(block_votes(r, top_k), policy)


def window_rows(S: int, L: int, block_size: int, first_position=None, row_valid=None):
    """The routing windows of S sequences of L rows (docs/routing.md, windows by absolute
    position): n_windows and, for each (sequence q, window slot j) that holds rows of this
    forward, (q, j, lo, hi, real) with rows [lo, hi) in the window and real [hi - lo] bool."""
    bs = block_size
    shift = (torch.zeros(S, dtype=torch.int64) if first_position is None
             else first_position.detach().reshape(S).cpu().long() % bs)
    valid = (torch.ones(S, L, dtype=torch.bool) if row_valid is None
             else row_valid.detach().reshape(S, L).cpu().bool())
    n_windows = -(-L // bs) if first_position is None else -(-(L + bs - 1) // bs)
    held = []
    for q in range(S):
        for j in range(n_windows):
            lo, hi = max(0, j * bs - int(shift[q])), min(L, (j + 1) * bs - int(shift[q]))
            if lo < hi:  # else no row of this forward in the window slot
                held.append((q, j, lo, hi, valid[q, lo:hi]))
    return n_windows, held


def route_reference(logits: torch.Tensor, expert_bias: torch.Tensor, cfg: RouterConfig,
                    policy: RoutingPolicy, first_position=None, row_valid=None, row_masked=None):
    """docs/routing.md in plain PyTorch. Returns (topk_ids int32, topk_weights, coreset or None).

    first_position: int [...] (one per sequence) or None (0): the absolute position of each
    sequence's row 0; row i sits in window (first_position + i) // block_size.
    row_valid: bool [..., L] or None (all real): padding rows never vote.
    row_masked: bool [..., L] or None (no row masked): the rows that hold the mask token, read
    by the expert-choice capacity schedules only.
    Block policies return coreset [..., n_windows, E]: window slot j is the absolute window
    first_position // block_size + j; n_windows = cdiv(L, block_size) without first_position,
    cdiv(L + block_size - 1, block_size) with it. A window with no real row has an empty
    coreset, so its (padding) rows take no expert.
    """
    lead, (L, E) = logits.shape[:-2], logits.shape[-2:]
    x = logits.detach().reshape(-1, L, E).cpu()
    S = x.shape[0]
    s, r, bad = scores(x, expert_bias.detach().cpu())
    top_k = policy.slots(cfg)
    ids = torch.full((S, L, top_k), -1, dtype=torch.int64)
    coreset = None
    if policy.is_block:
        n_windows, held = window_rows(S, L, policy.block_size, first_position, row_valid)
        masked = (torch.zeros(S, L, dtype=torch.bool) if row_masked is None
                  else row_masked.detach().reshape(S, L).cpu().bool())
        pick_cfg = policy.pick_config(cfg)  # capacity: a plain top-k inside the window
        coreset = torch.zeros(S, n_windows, E, dtype=torch.bool)
        for q, j, lo, hi, real in held:
            if real.any():
                coreset[q, j] = window_coreset(r[q, lo:hi][real], policy, cfg.top_k)
            if policy.is_expert_choice:
                ids[q, lo:hi] = expert_choice_window(r[q, lo:hi], real, masked[q, lo:hi],
                                                     coreset[q, j], policy)
                continue
            cand = coreset[q, j].expand(hi - lo, E)
            ids[q, lo:hi] = group_limited_topk(r[q, lo:hi], cand, pick_cfg, top_k)
    else:
        for q in range(S):
            ids[q] = group_limited_topk(r[q], torch.ones_like(r[q], dtype=torch.bool), cfg, top_k)
    weights = scaled_weights(s, ids, bad, cfg.routed_scaling_factor)
    dev = logits.device
    ids = ids.to(torch.int32).reshape(*lead, L, top_k).to(dev)
    weights = weights.reshape(*lead, L, top_k).to(dev)
    if coreset is not None:
        coreset = coreset.reshape(*lead, coreset.shape[1], E).to(dev)
    return ids, weights, coreset


def expert_choice_capacity(policy: RoutingPolicy, rows: int, masked: int, eligible: int) -> int:
    """Tokens each eligible expert of a window takes (docs/routing.md, Expert choice): rows real
    rows of which `masked` hold the mask token, `eligible` experts. In integers, so exact:
    c = min(rows, cdiv(rows * k, eligible)), rows * k = rows * k_min + (k_max - k_min) * n with
    n = 0 (fixed), masked (linear) or rows - masked (linear_reverse); 0 without rows."""
    if rows == 0 or eligible == 0:
        return 0
    n = {"fixed": 0, "linear": masked, "linear_reverse": rows - masked}[policy.schedule]
    total = rows * policy.k_min + (policy.k_max - policy.k_min) * n
    return min(rows, -(-total // eligible))


def expert_choice_window(r: torch.Tensor, real: torch.Tensor, masked: torch.Tensor,
                         eligible: torch.Tensor, policy: RoutingPolicy) -> torch.Tensor:
    """Expert choice in one window: r [T, E] scores of its rows, real [T] / masked [T] bool,
    eligible [E] bool (its coreset). Returns ids [T, E]: e where expert e took the row, else
    -1. Each eligible expert takes its c largest r over the real rows (ties: lower row); a -inf
    value (a NaN score) is never taken."""
    T, E = r.shape
    c = expert_choice_capacity(policy, int(real.sum()), int((masked & real).sum()),
                               int(eligible.sum()))
    col = torch.where(real[:, None], r, torch.tensor(float("-inf"), dtype=r.dtype)).T  # [E, T]
    took = torch.zeros(E, T, dtype=torch.bool).scatter_(1, sort_desc(col)[:, :c], True).T
    took &= eligible[None, :] & real[:, None] & (r > float("-inf"))
    return torch.where(took, torch.arange(E).expand(T, E), -1)


# ---------------------------------------------------------------------------------------------
# Expert MLP
# ---------------------------------------------------------------------------------------------

def expert_mlp_reference(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                         activation_groups=None) -> torch.Tensor:
    """One expert on rows x [N, H]: down(silu(gate(x)) * up(x)) with w_gate_up [2I, H] (gate rows,
    then up rows) and w_down [H, I], in x's dtype (fp32 or float64: the caller's accumulation
    type). activation_groups: None, or (x_group, act_group): x and act quantized per row and
    group of columns as quant.quantize_activations does (the fp8 dot, W8A8)."""
    inter = w_gate_up.shape[0] // 2
    quantize = lambda t, group: t  # noqa: E731
    if activation_groups is not None:
        from .quant import quantize_activations as quantize
    x = quantize(x, activation_groups and activation_groups[0])
    w_gu = w_gate_up.to(x.dtype)
    act = torch.nn.functional.silu(x @ w_gu[:inter].T) * (x @ w_gu[inter:].T)
    return quantize(act, activation_groups and activation_groups[1]) @ w_down.to(x.dtype).T


def moe_forward_reference(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                          w_gate_up: torch.Tensor, w_down: torch.Tensor,
                          shared=None, activation_groups=None) -> torch.Tensor:
    """The routed experts of one MoE layer: y[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]).

    expert_e(x) = down_e(silu(gate_e(x)) * up_e(x)) with w_gate_up [E, 2I, H] (gate rows, then up
    rows) and w_down [E, H, I]. A slot whose id is outside [0, E) (-1 = empty) contributes nothing.
    shared: optional (gate_up [2I, H], down [H, I]) of a shared expert, added with weight 1 for
    every token in the same sum. Computes in fp32 (float64 if given float64), returns hidden's
    dtype (one rounding at the end), row-major whatever hidden's layout.
    NaN rule (docs/routing.md, NaN): a NaN weight in a filled slot makes its token NaN (the sum
    does it), and so does a token with every slot empty and every weight NaN (route's all-NaN
    logits row: ids -1, NaN weights): NaN, never 0. An empty slot's weight is otherwise unread.
    activation_groups: None, or (x_group, act_group) for FP8 experts' fp8 dot (W8A8): every
    expert, the shared one included (FP8 too, in the same launches), takes x, and its down
    takes act, quantized per row and group of columns (expert_mlp_reference).
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)
    x = hidden.to(acc)
    E = w_gate_up.shape[0]
    y = torch.zeros(x.shape, dtype=acc, device=x.device)
    if shared is not None:
        y += expert_mlp_reference(x, shared[0], shared[1], activation_groups)
    for e in range(E):
        tokens, slots = torch.nonzero(topk_ids == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        out = expert_mlp_reference(x[tokens], w_gate_up[e], w_down[e], activation_groups)
        y.index_add_(0, tokens, out * topk_weights[tokens, slots].to(acc)[:, None])
    if topk_ids.shape[1]:
        empty = ((topk_ids < 0) | (topk_ids >= E)).all(dim=-1)
        y[empty & torch.isnan(topk_weights).all(dim=-1)] = float("nan")
    return y.to(hidden.dtype)


# ---------------------------------------------------------------------------------------------
# LLaDA2 attention prep (dmoe_triton/attention.py): the model's own eager ops, which the kernel
# must reproduce.


def greedy_pick_reference(logits: torch.Tensor):
    """(token int64 [...], confidence fp32 [...]) of logits [..., V]: the first index of each
    row's largest logit, and its softmax probability (fp32). A row whose softmax is undefined
    (a NaN or +inf logit, or every logit -inf) gets token 0 and confidence NaN, which is what
    softmax-then-argmax gives (every probability NaN)."""
    x = logits.float()
    undefined = (torch.isnan(x) | (x == float("inf"))).any(-1) | (x.amax(-1) == float("-inf"))
    tok = torch.where(undefined, 0, x.argmax(-1))
    return tok, x.softmax(-1).gather(-1, tok[..., None]).squeeze(-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x) over the last dim: fp32 statistics, cast back, then the weight (the
    published order of operations; F.rms_norm upcasts internally and rounds once)."""
    return weight * torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=eps)


def add_rms_norm_reference(x: torch.Tensor, delta, weight: torch.Tensor, eps: float):
    """(h, y): h = x + delta (x when delta is None), y = rms_norm(h, weight, eps): the decoder
    layer's residual add and the norm that reads it, as eager torch ops."""
    h = x if delta is None else x + delta
    return h, rms_norm(h, weight, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, hd], cos/sin [B, L, rotary_dim]: NeoX RoPE on the first rotary_dim dims."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def attention_prep_reference(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                             cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                             num_kv_heads: int, eps: float):
    """qkv [B, L, (nh + 2 nkv) * hd] -> q [B, nh, L, hd], k, v [B, nkv, L, hd]: per-head RMSNorm
    of q and k, then RoPE on their first rotary_dim dims; v as projected."""
    B, L, _ = qkv.shape
    hd = q_weight.shape[0]
    heads = qkv.view(B, L, num_heads + 2 * num_kv_heads, hd).transpose(1, 2)
    q, k, v = heads.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    q = apply_rope(rms_norm(q, q_weight, eps), cos, sin)
    k = apply_rope(rms_norm(k, k_weight, eps), cos, sin)
    return q, k, v


def block_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                              mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in fp32, GQA with the query heads stacked per KV head.

    q [B, nh, l, hd], keys/values [B, nkv, n, hd], mask [B, 1, (nh / nkv) * l, n] additive
    (row g * l + i: query i of head kv * (nh / nkv) + g) -> [B, l, nh * hd] in q's dtype.
    """
    B, nh, l, hd = q.shape
    nkv = keys.shape[1]
    stacked = q.float().reshape(B, nkv, (nh // nkv) * l, hd)
    s = stacked @ keys.float().transpose(-1, -2) * scale + mask.float()
    out = torch.softmax(s, dim=-1) @ values.float()
    return out.reshape(B, nh, l, hd).transpose(1, 2).reshape(B, l, nh * hd).to(q.dtype)


def align_slots_reference(ids: torch.Tensor, num_experts: int, block_m: int,
                          shared: bool = False):
    """moe.align_slots in torch ops (the reference of its counting sort): the same SlotLists.
    ids: int32/int64 [T, top_k] (-1 or out of range = empty); shared: each token has one more
    slot, its last, for expert num_experts - 1 (the routed ids' range ends below it)."""
    from .moe import SlotLists

    E = num_experts
    routed = ids.long()
    bucket = torch.where((routed >= 0) & (routed < E - shared), routed, E)
    if shared:
        bucket = torch.cat([bucket, bucket.new_full((ids.shape[0], 1), E - 1)], dim=1)
    bucket = bucket.reshape(-1)
    sorted_slots = torch.sort(bucket, stable=True).indices.to(torch.int32)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=bucket.device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    counts = counts[:E]
    starts = torch.cumsum(counts, 0) - counts
    is_used = counts > 0
    # Used experts first, in expert order: a stable sort on "unused".
    order = torch.sort((~is_used).to(torch.int8), stable=True).indices
    tiles = (counts[order] + block_m - 1) // block_m  # 0 for the unused ranks at the end
    first_tiles = torch.cumsum(tiles, 0) - tiles      # = n_tiles from n_used on
    ranked = [t.to(torch.int32) for t in (order, starts[order], counts[order])]
    return SlotLists(sorted_slots, *ranked, is_used.sum().reshape(1).to(torch.int32),
                     first_tiles.to(torch.int32), tiles.sum().reshape(1).to(torch.int32))
