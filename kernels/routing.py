"""Fused routing: block votes -> top-p coreset -> coreset-masked group-limited top-k.

One launch per MoE layer. For block policies a program owns one block of one sequence: it sums
the block's votes, ranks them, writes the block's coreset, then routes the block's tokens inside
it. For token policies a program owns BLOCK_T consecutive rows and skips the coreset phases.

Expert e lives at tile position (g, j) with e = g * GROUP_SIZE + j, so group statistics are plain
reductions over the last axis whatever the group size (padded to powers of two).
The spec (routing-spec.md) and its reference (dmoe_triton/reference.py) define every tie rule.
"""
import triton
import triton.language as tl

NEG_INF = float("-inf")


@triton.jit
def _max2(x):
    return tl.max(tl.max(x, axis=2), axis=1)


@triton.jit
def _min2(x):
    return tl.min(tl.min(x, axis=2), axis=1)


@triton.jit
def _load_scores(logits_ptr, bias_ptr, rows, row_ok, col, col_ok, E: tl.constexpr):
    """s = sigmoid(logits), r = s + bias over a [BLOCK_T, G_PAD, GS_PAD] tile.

    Invalid slots (padding, rows past the block) rank as -inf. A NaN in r ranks as -inf too and
    flags its row `bad` (its weights become NaN: visible downstream, never silent).
    """
    valid = row_ok & col_ok
    x = tl.load(logits_ptr + rows * E + col, mask=valid, other=0.0)
    s = tl.sigmoid(x)
    r = s + tl.load(bias_ptr + col, mask=col_ok, other=0.0)
    is_nan = (r != r) & valid
    bad = tl.max(tl.max(is_nan.to(tl.int32), axis=2), axis=1) > 0
    r = tl.where(valid & (r == r), r, NEG_INF)
    return r, bad, valid


@triton.jit
def _pick_best(work, valid, col):
    """Largest value per row and its lowest column (ties: lower expert index)."""
    best = _max2(work)
    at = _min2(tl.where((work == best[:, None, None]) & valid, col, 1 << 30))
    return best, at


@triton.jit
def _pick_best_in_group(masked, cand, j):
    """Per (row, group): the largest value and its lowest in-group position."""
    top1 = tl.max(masked, axis=2)
    at1 = tl.min(tl.where((masked == top1[:, :, None]) & cand, j, 1 << 30), axis=2)
    return top1, at1


@triton.jit
def route_kernel(
    logits_ptr, bias_ptr, ids_ptr, weights_ptr, coreset_ptr, votes_ptr,
    L, n_blocks, block_size,
    top_p, guard, coreset_size, scaling,
    E: tl.constexpr, N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr, VOTE_K: tl.constexpr, POLICY: tl.constexpr,  # 0 token, 1 dmoe, 2 des_vote
    BLOCK_T: tl.constexpr, G_PAD: tl.constexpr, GS_PAD: tl.constexpr, K_PAD: tl.constexpr,
    RANK_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    seq = pid // n_blocks
    blk = pid % n_blocks
    row_start = blk * block_size
    row_end = tl.minimum(row_start + block_size, L)
    base = seq * L  # first row of this sequence in the flattened [S * L, E] view

    t = tl.arange(0, BLOCK_T)[:, None, None]
    g = tl.arange(0, G_PAD)[None, :, None]
    j = tl.arange(0, GS_PAD)[None, None, :]
    col = g * GROUP_SIZE + j
    col_ok = (g < N_GROUP) & (j < GROUP_SIZE)
    E_PAD: tl.constexpr = G_PAD * GS_PAD

    if POLICY != 0:
        # --- votes: each real row adds its plain top-VOTE_K values of r ---------------------
        votes = tl.zeros([G_PAD, GS_PAD], dtype=tl.float32)
        for c in range(row_start, row_end, BLOCK_T):
            rows = base + c + t
            r, bad, valid = _load_scores(logits_ptr, bias_ptr, rows, c + t < row_end, col, col_ok, E)
            work = r
            for _ in tl.static_range(VOTE_K):
                best, at = _pick_best(work, valid, col)
                hit = col == at[:, None, None]
                # A -inf pick is an empty slot and casts no vote.
                gain = tl.where(hit & (best[:, None, None] > NEG_INF), best[:, None, None], 0.0)
                votes += tl.sum(gain, axis=0)
                work = tl.where(hit, NEG_INF, work)
        votes = votes / (tl.sum(tl.sum(votes, axis=1), axis=0) + 1e-20)
        vrow = votes_ptr + pid * E
        g2 = tl.arange(0, G_PAD)[:, None]
        j2 = tl.arange(0, GS_PAD)[None, :]
        tl.store(vrow + g2 * GROUP_SIZE + j2, votes, mask=(g2 < N_GROUP) & (j2 < GROUP_SIZE))
        tl.debug_barrier()

        # --- rank the votes (desc, ties to the lower index) and take the coreset ------------
        e = tl.arange(0, E_PAD)
        e_ok = e < E
        v = tl.load(vrow + e, mask=e_ok, other=NEG_INF)
        rank = tl.zeros([E_PAD], dtype=tl.int32)
        mass_before = tl.zeros([E_PAD], dtype=tl.float32)
        for c0 in tl.static_range(0, E_PAD, RANK_CHUNK):
            ec = c0 + tl.arange(0, RANK_CHUNK)
            vc = tl.load(vrow + ec, mask=ec < E, other=NEG_INF)
            ahead = (vc[:, None] > v[None, :]) | ((vc[:, None] == v[None, :]) & (ec[:, None] < e[None, :]))
            ahead = ahead & (ec[:, None] < E)
            rank += tl.sum(ahead.to(tl.int32), axis=0)
            mass_before += tl.sum(tl.where(ahead, vc[:, None], 0.0), axis=0)
        if POLICY == 1:
            cumulative = mass_before + v  # mass of e and every expert ranked ahead of it
            # top_p = 1 keeps every expert, as exact arithmetic would (reference.block_coreset).
            within = (cumulative <= top_p) | (top_p >= 1.0)
            past = (~within) & e_ok
            first_past = tl.min(tl.where(past, rank, E_PAD), axis=0)
            keep = within | (rank == first_past) | (rank == 0)
            keep = keep & e_ok
            n_kept = tl.sum(keep.to(tl.int32), axis=0)
            keep = tl.where(n_kept < guard, rank < guard, keep)
        else:
            keep = rank < coreset_size
        tl.store(coreset_ptr + pid * E + e, keep.to(tl.uint8), mask=e_ok)
        tl.debug_barrier()
        in_coreset = tl.load(coreset_ptr + pid * E + col, mask=col_ok, other=0) != 0
    else:
        in_coreset = col_ok

    # --- route every row of the block inside its candidate set ------------------------------
    kk = tl.arange(0, K_PAD)[None, :]
    for c in range(row_start, row_end, BLOCK_T):
        rows = base + c + t
        row_ok = c + t < row_end
        r, bad, valid = _load_scores(logits_ptr, bias_ptr, rows, row_ok, col, col_ok, E)
        cand = in_coreset & valid
        masked = tl.where(cand, r, NEG_INF)

        # Group ranking: class 2 (>= 2 candidates, sum of top two) > class 1 (one, its value)
        # > class 0 (none); ties to the lower group. Padding groups rank below everything.
        top1, at1 = _pick_best_in_group(masked, cand, j)
        top2 = tl.max(tl.where(j == at1[:, :, None], NEG_INF, masked), axis=2)
        count = tl.sum(cand.to(tl.int32), axis=2)
        gi = tl.arange(0, G_PAD)[None, :]
        cls = tl.where(count >= 2, 2, tl.where(count == 1, 1, 0))
        cls = tl.where(gi < N_GROUP, cls, -1)
        score = tl.where(count >= 2, top1 + top2, tl.where(count == 1, top1, 0.0))
        c_a, c_b = cls[:, :, None], cls[:, None, :]          # a = this group, b = a rival
        s_a, s_b = score[:, :, None], score[:, None, :]
        g_a, g_b = gi[:, :, None], gi[:, None, :]
        rival_ahead = (c_b > c_a) | ((c_b == c_a) & ((s_b > s_a) | ((s_b == s_a) & (g_b < g_a))))
        group_rank = tl.sum(rival_ahead.to(tl.int32), axis=2)
        kept_group = (group_rank < TOPK_GROUP) & (gi < N_GROUP)
        work = tl.where(kept_group[:, :, None], masked, NEG_INF)

        ids = tl.full([BLOCK_T, K_PAD], -1, dtype=tl.int32)
        w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
        row1 = base + c + tl.arange(0, BLOCK_T)
        row1_ok = c + tl.arange(0, BLOCK_T) < row_end
        for i in tl.static_range(TOP_K):
            best, at = _pick_best(work, valid, col)
            filled = best > NEG_INF
            # The weight is the unbiased sigmoid of the pick, re-read from the logits row.
            x_at = tl.load(logits_ptr + row1 * E + at, mask=row1_ok & filled, other=0.0)
            w_at = tl.where(filled, tl.sigmoid(x_at), 0.0)
            ids = tl.where(kk == i, tl.where(filled, at, -1)[:, None], ids)
            w = tl.where(kk == i, w_at[:, None], w)
            work = tl.where(col == at[:, None, None], NEG_INF, work)
        w = w / (tl.sum(w, axis=1)[:, None] + 1e-20) * scaling
        w = tl.where(bad[:, None], float("nan"), w)
        out = row1[:, None] * TOP_K + kk
        out_ok = row1_ok[:, None] & (kk < TOP_K)
        tl.store(ids_ptr + out, ids, mask=out_ok)
        tl.store(weights_ptr + out, w, mask=out_ok)
