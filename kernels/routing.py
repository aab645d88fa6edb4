"""Routing: block votes -> top-p coreset, then coreset-masked group-limited top-k.

Three launches per MoE layer for block policies, one for token policies:
- `block_votes_kernel`: programs (window, part) each compute a share of a window's votes (a
  row's top-k is a long chain of reductions: spread over SMs, not walked by one program);
- `block_coreset_kernel`: one program per block of one sequence sums the block's votes (the
  shares, or all rows itself when the votes are not split), sorts them (bitonic
  sort of packed keys, then a scan for top-p) and writes the block's coreset;
- `route_kernel`: one program per BLOCK_T rows (of one block) routes them inside their block's
  coreset (or among all experts for token policies).
Splitting lets the per-row picks, the longest chain of dependent reductions, run on many SMs at
once instead of after the votes in the block's one program. The coreset stays its own launch:
the window's last vote program doing it instead (no launch between) measured slower on the
H200, 11.5 against 9.2 us for one dMoE block (bench/results/h200-2026-12-01-s13), and so did
every route program finding its window's coreset itself (a sort of the votes per one-warp
program, two launches instead of three): 9.8 against 8.7 us, and 15.3 against 13.8 us per dMoE
layer in the 20-layer forward (bench/results/h200-2026-12-02-s22, coreset_in_route.patch).

Expert e lives at tile position (g, j) with e = g * GROUP_SIZE + j, so group statistics are plain
reductions over the last axis whatever the group size (padded to powers of two).

Speed: the routing of a block is a chain of small reductions, so its time is their latency.
Every pick is one max over int64 keys that pack (score, expert): the high 32 bits order the
fp32 score, the low bits order experts so that ties go to the lower index. One reduction thus
yields the value and the index together, and a chosen expert is struck out by its unique key.
The window's votes (_window_scores) use fp32 reductions instead: each row's top_k-th largest
value, found by walking its distinct values down with one fp32 max and count per step, then
every value above it and the lowest-index values equal to it; the rows lie in a tile where a
row's reductions stay inside one warp (shuffles, no barrier). The int64 picks they replace,
over a tile whose rows spanned two warps, cost 12.5 us more than capacity routing's max per
expert on the H200 (one 32-row window, E = 256, bench_routing --quick).
The contract (docs/routing.md) and its reference (dmoe_triton/reference.py) define every tie rule.
"""
import triton
import triton.language as tl

from .pdl import wait_previous_kernel
from .policy_codes import CAPACITY, DMOE

NEG_INF = tl.constexpr(float("-inf"))
# Keys of slots that can never be picked (padding, already chosen): below every real key.
NO_KEY = tl.constexpr(-(2**63))
INDEX_BITS = tl.constexpr(16)            # experts per layer < 2**16
INDEX_MASK = tl.constexpr(2**16 - 1)
# Ordered int32 image of -inf (see _ordered); a pick whose key is not above it is an empty slot.
ORD_NEG_INF = tl.constexpr(-2139095041)


@triton.jit
def _ordered(x):
    """fp32 -> int32 with the same order (for non-NaN x; -0.0 must already be +0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _key(x, index):
    """int64 key: larger x first, then lower index."""
    return (_ordered(x).to(tl.int64) << INDEX_BITS) + (index ^ INDEX_MASK)  # == MASK - index


@triton.jit
def _key_index(key):
    return ((key & INDEX_MASK) ^ INDEX_MASK).to(tl.int32)


@triton.jit
def _key_filled(key):
    """The pick is a real expert with a score above -inf."""
    return (key >> INDEX_BITS) > ORD_NEG_INF


@triton.jit
def _max2(x):
    return tl.max(tl.max(x, axis=2), axis=1)


@triton.jit
def _load_scores(logits_ptr, bias_ptr, rows, row_ok, col, col_ok, E: tl.constexpr):
    """r = sigmoid(logits) + bias and its keys over a tile of rows x experts.

    Padding and rows past the block get NO_KEY. A NaN in r ranks as -inf and is flagged in
    `is_nan` (its row's weights become NaN: visible downstream, never silent).
    """
    valid = row_ok & col_ok
    x = tl.load(logits_ptr + rows * E + col, mask=valid, other=0.0)
    r = tl.sigmoid(x) + tl.load(bias_ptr + col, mask=col_ok, other=0.0)
    is_nan = (r != r) & valid
    r = tl.where(r == r, r + 0.0, NEG_INF)  # + 0.0 turns -0.0 into +0.0: keys order them equal
    keys = tl.where(valid, _key(r, col), NO_KEY)
    return r, keys, is_nan


@triton.jit
def _key_value(key):
    """The fp32 score a key packs (inverse of _ordered; NO_KEY decodes to a finite junk value)."""
    ordered = (key >> INDEX_BITS).to(tl.int32)
    return tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True)


@triton.jit
def _window_shift(first_position_ptr, seq, block_size):
    """Rows of the forward's first window held by an earlier forward: first_position mod
    block_size, floored for negative positions (left padding); 0 without first_position."""
    shift = 0
    if first_position_ptr is not None:
        p0 = tl.load(first_position_ptr + seq).to(tl.int64)
        shift = ((p0 % block_size) + block_size) % block_size
    return shift


@triton.jit
def _row_max(x):
    """Max of each row of a [rows, slices, cols] tile (a row's experts on axes 1 and 2): [rows].
    Slices first: they lie inside each thread, so one value per row and thread crosses lanes."""
    return tl.max(tl.max(x, axis=1), axis=1)


@triton.jit
def _row_count(flags):
    """How many of each row's flags [rows, slices, cols] are set: int32 [rows]."""
    return tl.sum(tl.sum(flags.to(tl.int32), axis=1), axis=1)


@triton.jit
def _vote_threshold(r, VOTE_K: tl.constexpr):
    """Each row's VOTE_K-th largest value of r (fp32 [rows, slices, cols], no NaN; counted with
    multiplicity) and how many of the row's values lie strictly above it: fp32 and int32 [rows].

    Walks each row's distinct values downwards, one fp32 max per step: the i-th distinct value
    has at least i values at or above it, so the first one with VOTE_K comes within VOTE_K
    steps. The count of a step does not feed the next max, so the two reductions overlap."""
    m = _row_max(r)  # the row's largest distinct value
    threshold = tl.full(m.shape, NEG_INF, dtype=tl.float32)
    above = tl.zeros(m.shape, dtype=tl.int32)
    for i in tl.static_range(VOTE_K):
        at_or_above = r >= m[:, None, None]
        n = _row_count(at_or_above)  # nondecreasing in i, >= VOTE_K by the last step
        # The threshold is the largest m with VOTE_K values at or above it; strictly above it
        # lie the most values that fall short of VOTE_K.
        threshold = tl.maximum(threshold, tl.where(n >= VOTE_K, m, NEG_INF))
        above = tl.maximum(above, tl.where(n < VOTE_K, n, 0))
        if i + 1 < VOTE_K:
            m = _row_max(tl.where(at_or_above, NEG_INF, r))  # the next distinct value
    return threshold, above


@triton.jit
def _tie_rank(tied):
    """Exclusive prefix count of tied (int32 0/1 [rows, slices, cols]) along each row in expert
    order (expert = slice * cols + col): how many tied values of the row come before each.
    The slices' prefix is a scan of the 2-D per-slice counts: Triton 3.6 fails to lower a scan
    along the slices of the 3-D tile (ScanOpToLLVM assertion, sm_90)."""
    per_slice = tl.sum(tied, axis=2)
    before = tl.cumsum(per_slice, axis=1) - per_slice
    return tl.cumsum(tied, axis=2) - tied + before[:, :, None]


@triton.jit
def _row_votes(r, VOTE_K: tl.constexpr):
    """What each row of r (fp32 [rows, slices, cols], expert = slice * cols + col, no NaN)
    votes, fp32 of r's shape: r at the row's plain top-VOTE_K (ties to the lower expert), 0
    elsewhere; a -inf pick casts no vote (docs/routing.md, dMoE coreset step 1).

    Every value above the row's threshold is a pick, and the lowest-index values equal to it
    fill the remaining slots."""
    threshold, above = _vote_threshold(r, VOTE_K)
    threshold = threshold[:, None, None]
    tied = (r == threshold).to(tl.int32)
    fill = _tie_rank(tied) < VOTE_K - above[:, None, None]
    picked = (r > threshold) | ((tied != 0) & fill)
    return tl.where(picked & (r > NEG_INF), r, 0.0)


@triton.jit
def _window_votes(logits_ptr, bias_ptr, row_valid_ptr, base, row_start, row_end,
                  E: tl.constexpr, VOTE_K: tl.constexpr, MAX_SCORE: tl.constexpr,
                  BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, VOTE_COLS: tl.constexpr):
    """What rows [row_start, row_end) of a window rank its experts by, raw: each real row's
    plain top-VOTE_K values of r summed (the votes of dMoE and DES-vote), or with MAX_SCORE
    each expert's maximum r (LLaDA2.2 capacity routing; -inf without a real row). Returns
    (score fp32 [E_PAD // VOTE_COLS, VOTE_COLS], expert = slice * VOTE_COLS + col; real rows
    int32 [1]).

    A chunk of BLOCK_T rows is held as [BLOCK_T, SLICES, VOTE_COLS] (SLICES = E_PAD /
    VOTE_COLS). Triton 3.6 lays lanes along the columns, then lanes and warps along the rows
    (the first axis of equal contiguity), and the slices inside each thread: with VOTE_COLS at
    most 32 a row's reductions stay inside one warp (shuffles, no shared memory or barrier),
    where a [rows, E] tile spreads a row over warps. (Triton 3.9 breaks that tie the other
    way: re-check the layout on an upgrade.)"""
    SLICES: tl.constexpr = E_PAD // VOTE_COLS
    t = tl.arange(0, BLOCK_T)[:, None, None]
    col = tl.arange(0, SLICES)[None, :, None] * VOTE_COLS + tl.arange(0, VOTE_COLS)[None, None, :]
    col_ok = col < E
    if MAX_SCORE:
        score = tl.full([SLICES, VOTE_COLS], NEG_INF, dtype=tl.float32)
    else:
        score = tl.zeros([SLICES, VOTE_COLS], dtype=tl.float32)
    real_rows = tl.zeros([1], dtype=tl.int32)
    for chunk_start in range(row_start, row_end, BLOCK_T):
        rows = chunk_start + t
        voting = rows < row_end
        if row_valid_ptr is not None:
            voting &= tl.load(row_valid_ptr + base + rows, mask=voting, other=0) != 0
        real_rows += tl.sum(voting.to(tl.int32))
        r, _, _ = _load_scores(logits_ptr, bias_ptr, base + rows, voting, col, col_ok, E)
        r = tl.where(voting & col_ok, r, NEG_INF)  # padding never votes, nor reaches a max
        if MAX_SCORE:
            score = tl.maximum(score, tl.max(r, axis=0))
        else:
            score += tl.sum(_row_votes(r, VOTE_K), axis=0)
    return score, real_rows


@triton.jit
def _normalised(score, MAX_SCORE: tl.constexpr):
    """Votes [E_PAD] as shares of their sum (dMoE's top-p mass); a capacity score as it is."""
    if not MAX_SCORE:
        score = score / (tl.sum(score, axis=0) + 1e-20) + 0.0  # + 0.0: -0.0 keys like +0.0
    return score


@triton.jit
def _window_scores(logits_ptr, bias_ptr, row_valid_ptr, base, row_start, row_end,
                   E: tl.constexpr, VOTE_K: tl.constexpr, MAX_SCORE: tl.constexpr,
                   BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, VOTE_COLS: tl.constexpr):
    """_window_votes in expert order, normalised (_normalised): (score fp32 [E_PAD], real rows
    int32 [1])."""
    score, real_rows = _window_votes(logits_ptr, bias_ptr, row_valid_ptr, base, row_start,
                                     row_end, E, VOTE_K, MAX_SCORE, BLOCK_T, E_PAD, VOTE_COLS)
    # Expert order (slice * VOTE_COLS + col), then one expert per thread again: the gather
    # moves the scores out of the slices' layout (each thread holds SLICES of them, the same
    # in every warp), where the sort that follows would do SLICES times the work per thread.
    e = tl.arange(0, E_PAD)
    score = tl.gather(tl.reshape(score, [E_PAD]), e, 0)
    return _normalised(score, MAX_SCORE), real_rows


@triton.jit
def _window_start(first_position_ptr, window, n_blocks, block_size):
    """First row (maybe negative: held by an earlier forward) of window slot `window` (= seq *
    n_blocks + slot) in its sequence (docs/routing.md, windows by absolute position)."""
    seq = window // n_blocks
    return (window % n_blocks) * block_size - _window_shift(first_position_ptr, seq, block_size)


@triton.jit
def block_votes_kernel(
    logits_ptr, bias_ptr, votes_ptr, real_ptr, first_position_ptr, row_valid_ptr,
    L, n_blocks, block_size, part_rows,
    E: tl.constexpr, VOTE_K: tl.constexpr, MAX_SCORE: tl.constexpr,
    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, VOTE_COLS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """A share of a window's votes; grid (S * n_blocks, parts): program (window, part) takes the
    window's rows [part * part_rows, (part + 1) * part_rows).

    Writes votes_ptr fp32 [S * n_blocks, parts, E_PAD] (_window_votes' raw score, expert
    order) and real_ptr int32 [S * n_blocks, parts] (its real rows); block_coreset_kernel adds
    the parts. Why: a row's top-VOTE_K is a chain of reductions whose
    instructions fill one SM for microseconds over a 32-row window (bench_routing, H200), so
    the rows are spread over SMs. Other arguments: block_coreset_kernel's."""
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    window = tl.program_id(0).to(tl.int64)  # int64: (seq * L + row) * E passes 2**31 (issue 11)
    part = tl.program_id(1)
    start = _window_start(first_position_ptr, window, n_blocks, block_size)
    end = tl.minimum(start + block_size, L)
    row_start = tl.maximum(start + part * part_rows, 0)
    row_end = tl.minimum(start + (part + 1) * part_rows, end)
    score, real_rows = _window_votes(logits_ptr, bias_ptr, row_valid_ptr,
                                     (window // n_blocks) * L, row_start, row_end, E, VOTE_K,
                                     MAX_SCORE, BLOCK_T, E_PAD, VOTE_COLS)
    SLICES: tl.constexpr = E_PAD // VOTE_COLS
    e = tl.arange(0, SLICES)[:, None] * VOTE_COLS + tl.arange(0, VOTE_COLS)[None, :]
    slot = window * tl.num_programs(1) + part
    tl.store(votes_ptr + slot * E_PAD + e, score)
    tl.store(real_ptr + slot + tl.zeros([1], dtype=tl.int64), real_rows)


@triton.jit
def _summed_votes(votes_ptr, real_ptr, window, parts, E_PAD: tl.constexpr,
                  PARTS_PAD: tl.constexpr, MAX_SCORE: tl.constexpr):
    """A window's parts from block_votes_kernel added (the max with MAX_SCORE), then
    normalised: (score fp32 [E_PAD], real rows int32 [1]) as _window_scores'.

    The parts are loaded as one [PARTS_PAD, E_PAD] tile and reduced along the parts: the loads
    are independent, where a loop over the parts waited for each load in turn (a chain of
    `parts` L2 round trips). PARTS_PAD: next power of two >= parts."""
    e = tl.arange(0, E_PAD)[None, :]
    part = tl.arange(0, PARTS_PAD)
    slot = window * parts + part
    ok = part < parts
    # Padding parts must not count: -inf under a max, 0 under a sum.
    shares = tl.load(votes_ptr + slot[:, None] * E_PAD + e, mask=ok[:, None],
                     other=NEG_INF if MAX_SCORE else 0.0)
    score = tl.max(shares, axis=0) if MAX_SCORE else tl.sum(shares, axis=0)
    real_rows = tl.sum(tl.load(real_ptr + slot, mask=ok, other=0), axis=0)
    return _normalised(score, MAX_SCORE), real_rows + tl.zeros([1], dtype=tl.int32)


@triton.jit
def block_coreset_kernel(
    logits_ptr, bias_ptr, coreset_ptr, first_position_ptr, row_valid_ptr, votes_ptr, real_ptr,
    L, n_blocks, block_size, parts, top_p, guard, coreset_size,
    E: tl.constexpr, VOTE_K: tl.constexpr, POLICY: tl.constexpr,
    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, VOTE_COLS: tl.constexpr,
    PARTS_PAD: tl.constexpr = 1, PDL: tl.constexpr = False,
):
    """One routing window's coreset; grid (S * n_blocks,), program = sequence * n_blocks + slot.

    logits_ptr: fp32 [S, L, E] router logits, contiguous. bias_ptr: fp32 [E] expert bias.
    coreset_ptr: uint8 [S, n_blocks, E] out, 1 = expert in the window's coreset.
    first_position_ptr: int [S] absolute position of each sequence's row 0, or None (0):
    window slot j holds rows [j * block_size - shift, (j + 1) * block_size - shift) with
    shift = first_position mod block_size (docs/routing.md, windows by absolute position).
    row_valid_ptr: uint8 [S, L] (1 = real row), or None (all real): padding rows never vote,
    and a window without a real row keeps no expert.
    votes_ptr, real_ptr: block_votes_kernel's `parts` shares of every window's votes (then
    logits, bias, row_valid are not read), or None: the program votes itself.
    L: rows per sequence; n_blocks: window slots per sequence; block_size: rows per window.
    top_p (fp32), guard (experts): the dMoE rule; coreset_size (experts): the DES-vote size or
    the capacity policy's expert_capacity.
    E: experts; VOTE_K: experts each row votes for (the model's top-k); POLICY: a code of
    kernels/policy_codes.py (DMOE, DES_VOTE or CAPACITY); BLOCK_T: rows per vote chunk (power of two);
    E_PAD: next power of two >= E; VOTE_COLS: experts per slice of a row in the vote tile (a
    power of two <= E_PAD, see _window_votes).
    """
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    pid = tl.program_id(0).to(tl.int64)  # int64: (seq * L + row) * E passes 2**31 (issue 11)
    e = tl.arange(0, E_PAD)
    e_ok = e < E
    if votes_ptr is not None:
        score, real_rows = _summed_votes(votes_ptr, real_ptr, pid, parts, E_PAD, PARTS_PAD,
                                         POLICY == CAPACITY)
    else:
        row_start = _window_start(first_position_ptr, pid, n_blocks, block_size)
        row_end = tl.minimum(row_start + block_size, L)
        score, real_rows = _window_scores(logits_ptr, bias_ptr, row_valid_ptr,
                                          (pid // n_blocks) * L, tl.maximum(row_start, 0),
                                          row_end, E, VOTE_K, POLICY == CAPACITY, BLOCK_T,
                                          E_PAD, VOTE_COLS)

    # --- sort the votes (desc, ties to the lower index: the keys are unique) ----------------
    # A bitonic sort of the packed keys, then a scan: O(E log^2 E) steps instead of ranking
    # every vote against every other one, and the index travels inside the key.
    ranked = tl.sort(tl.where(e_ok, _key(score, e), NO_KEY), descending=True)
    expert = _key_index(ranked)  # expert at sorted position `e`
    cumulative = tl.cumsum(tl.where(e_ok, _key_value(ranked), 0.0), 0)
    keep = _keep(cumulative, e, e_ok, top_p, guard, coreset_size, POLICY, E_PAD)
    keep = keep & (real_rows > 0)  # a window of padding (or of no row here) keeps no expert
    # Scatter back to expert order: each real position names a distinct expert.
    tl.store(coreset_ptr + pid * E + expert, keep.to(tl.uint8), mask=e_ok)


@triton.jit
def _keep(cumulative, rank, e_ok, top_p, guard, coreset_size, POLICY: tl.constexpr,
          E_PAD: tl.constexpr):
    """The coreset rule over experts at rank `rank` (0 = most votes) whose inclusive cumulative
    vote mass in rank order is `cumulative` (used by dMoE only): dMoE keeps every expert within
    top_p, the first past it and the first, else the top-guard; DES-vote and capacity keep the
    top coreset_size. Padding (e_ok false) is never kept."""
    if POLICY == DMOE:
        # top_p = 1 keeps every expert, as exact arithmetic would (reference.block_coreset).
        within = ((cumulative <= top_p) | (top_p >= 1.0)) & e_ok
        first_past = tl.min(tl.where(e_ok & ~within, rank, E_PAD), axis=0)
        keep = (within | (rank == first_past) | (rank == 0)) & e_ok
        n_kept = tl.sum(keep.to(tl.int32), axis=0)
        keep = tl.where(n_kept < guard, rank < guard, keep)
    else:  # DES_VOTE, CAPACITY: a fixed number of experts
        keep = rank < coreset_size
    return keep & e_ok


@triton.jit
def _kept_groups(keys, r, cand, gi, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr):
    """[rows, G_PAD] bool: the TOPK_GROUP best groups of each row (docs/routing.md, common step 2).

    Group ranking: class 2 (>= 2 candidates, sum of top two) > class 1 (one, its value)
    > class 0 (none); ties to the lower group. Padding groups rank below everything.
    """
    key1 = tl.max(keys, axis=2)
    r_masked = tl.where(cand, r, NEG_INF)
    top1 = tl.max(r_masked, axis=2)
    top2 = tl.max(tl.where(keys == key1[:, :, None], NEG_INF, r_masked), axis=2)
    count = tl.sum(cand.to(tl.int32), axis=2)
    cls = tl.where(count >= 2, 2, tl.where(count == 1, 1, 0))
    cls = tl.where(gi < N_GROUP, cls, -1)
    score = tl.where(count >= 2, top1 + top2, tl.where(count == 1, top1, 0.0))
    c_a, c_b = cls[:, :, None], cls[:, None, :]          # a = this group, b = a rival
    s_a, s_b = score[:, :, None], score[:, None, :]
    g_a, g_b = gi[:, :, None], gi[:, None, :]
    rival_ahead = (c_b > c_a) | ((c_b == c_a) & ((s_b > s_a) | ((s_b == s_a) & (g_b < g_a))))
    group_rank = tl.sum(rival_ahead.to(tl.int32), axis=2)
    return (group_rank < TOPK_GROUP) & (gi < N_GROUP)


@triton.jit
def route_kernel(
    logits_ptr, bias_ptr, ids_ptr, weights_ptr, coreset_ptr, first_position_ptr,
    L, n_blocks, block_size, chunks_per_block, scaling,
    E: tl.constexpr, N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, G_PAD: tl.constexpr, GS_PAD: tl.constexpr,
    TOP_K_PAD: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Rows [chunk_start, chunk_start + BLOCK_T) of one block: coreset-masked (if any)
    group-limited top-k; grid (S * n_blocks * chunks_per_block,).

    logits_ptr: fp32 [S, L, E] contiguous; bias_ptr: fp32 [E].
    ids_ptr: int32 [S, L, TOP_K] out, -1 = empty slot; weights_ptr: fp32 [S, L, TOP_K] out.
    coreset_ptr: uint8 [S, n_blocks, E] from block_coreset_kernel, or None (token policies:
    every expert is a candidate). first_position_ptr: as block_coreset_kernel's (None: 0).
    L: rows per sequence; block_size: rows per block (token policies: BLOCK_T);
    chunks_per_block = cdiv(block_size, BLOCK_T); scaling: routed_scaling_factor (fp32).
    E, N_GROUP, GROUP_SIZE (= E / N_GROUP), TOPK_GROUP: the gate; TOP_K: slots per row;
    G_PAD, GS_PAD, TOP_K_PAD: next powers of two of N_GROUP, GROUP_SIZE, TOP_K.
    """
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    pid = tl.program_id(0).to(tl.int64)  # int64: (seq * L + row) * E passes 2**31 (issue 11)
    block_id = pid // chunks_per_block  # = seq * n_blocks + block
    seq = block_id // n_blocks
    block_start = _window_start(first_position_ptr, block_id, n_blocks, block_size)
    chunk_start = block_start + (pid % chunks_per_block) * BLOCK_T
    row_end = tl.minimum(block_start + block_size, L)
    _route_chunk(logits_ptr, bias_ptr, ids_ptr, weights_ptr, coreset_ptr, block_id, seq * L,
                 chunk_start, row_end, scaling, E, N_GROUP, GROUP_SIZE, TOPK_GROUP, TOP_K,
                 BLOCK_T, G_PAD, GS_PAD, TOP_K_PAD)


@triton.jit
def _route_chunk(logits_ptr, bias_ptr, ids_ptr, weights_ptr, coreset_ptr, block_id, base,
                 chunk_start, row_end, scaling,
                 E: tl.constexpr, N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
                 TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                 G_PAD: tl.constexpr, GS_PAD: tl.constexpr, TOP_K_PAD: tl.constexpr):
    """Route rows [chunk_start, chunk_start + BLOCK_T) ∩ [0, row_end) of the sequence whose row 0
    is flattened row `base`, inside window `block_id`'s coreset (uint8 [.., E] at coreset_ptr,
    or every expert when None); writes their ids and weights (route_kernel's contract)."""
    t = tl.arange(0, BLOCK_T)[:, None, None]
    g = tl.arange(0, G_PAD)[None, :, None]
    j = tl.arange(0, GS_PAD)[None, None, :]
    col = g * GROUP_SIZE + j
    col_ok = (g < N_GROUP) & (j < GROUP_SIZE)
    if coreset_ptr is not None:
        in_coreset = tl.load(coreset_ptr + block_id * E + col, mask=col_ok, other=0) != 0
    else:
        in_coreset = col_ok

    kk = tl.arange(0, TOP_K_PAD)[None, :]
    row = chunk_start + tl.arange(0, BLOCK_T)
    row_ok = (row >= 0) & (row < row_end)  # rows before 0 belong to an earlier forward
    rows = chunk_start + t
    r, keys, is_nan = _load_scores(logits_ptr, bias_ptr, base + rows, (rows >= 0) & (rows < row_end),
                                   col, col_ok, E)
    bad = _max2(is_nan.to(tl.int32)) > 0
    cand = in_coreset & (keys != NO_KEY)
    keys = tl.where(cand, keys, NO_KEY)
    kept_group = _kept_groups(keys, r, cand, tl.arange(0, G_PAD)[None, :], N_GROUP, TOPK_GROUP)
    work = tl.where(kept_group[:, :, None], keys, NO_KEY)

    ids = tl.full([BLOCK_T, TOP_K_PAD], -1, dtype=tl.int32)
    for i in tl.static_range(TOP_K):
        best = _max2(work)
        ids = tl.where(kk == i, tl.where(_key_filled(best), _key_index(best), -1)[:, None], ids)
        work = tl.where(work == best[:, None, None], NO_KEY, work)
    # The weight is the unbiased sigmoid of each pick: one gather from the logits rows.
    out = (base + row)[:, None] * TOP_K + kk
    out_ok = row_ok[:, None] & (kk < TOP_K)
    filled = out_ok & (ids >= 0)
    x_at = tl.load(logits_ptr + (base + row)[:, None] * E + ids, mask=filled, other=0.0)
    w = tl.where(filled, tl.sigmoid(x_at), 0.0)
    if TOP_K > 1:  # a top-1 gate does not normalise (every LLaDA2 gate: top_k > 1 only)
        w = w / (tl.sum(w, axis=1)[:, None] + 1e-20)
    w = w * scaling
    w = tl.where(bad[:, None], float("nan"), w)
    tl.store(ids_ptr + out, ids, mask=out_ok)
    tl.store(weights_ptr + out, w, mask=out_ok)
