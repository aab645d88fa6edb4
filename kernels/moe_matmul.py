"""Grouped expert matmul over a routing: only the experts that received tokens are read.

Six launches (seven with FP8 weights' activation prepass, moe_fp8.scaled_rows_kernel), all
with grid sizes fixed by shapes (CUDA-graph capturable, no host sync):

1. align (`align_count_kernel`, `align_lists_kernel`, `align_scatter_kernel`: a counting sort
   in three short launches): sorts the T*k slots by expert and lists the used experts
   (`used_expert`, `used_start`, `used_count`, `n_used`) and their BLOCK_M-slot tiles
   (`used_tile`, `n_tiles`). Ids outside the routed experts' range go to a sentinel bucket
   past the last expert and are never read as an expert. A shared expert is one more expert
   with one more slot per token that no tensor holds (`_routed_at`), so it costs no torch op
   on the hot path.
2. `moe_gate_up_kernel`: work item = (used expert, slice of BLOCK_I intermediate columns, tile
   of its slots); act[slot] = silu(x W_gate^T) * (x W_up^T) for the tile's slots.
3. `moe_down_kernel`: work item = (used expert, slice of BLOCK_H hidden columns, tile of its
   slots); partial[slot] = w[slot] * act[slot] W_down^T, in fp32 and rounded once to the
   output dtype.
4. `moe_combine_kernel`: y[t] = sum_j partial[t*K + j] (K = k, or k + 1 with a shared expert)
   over the filled slots in fp32, in a fixed order (deterministic), cast to the output dtype;
   NaN weights follow docs/routing.md's rule.

Kernels 2 and 3 are persistent: a fixed number of programs loops over the work items of the used
experts only, so an unused expert costs nothing, not even an empty program, and each used
expert's weight slice is read from HBM once per launch: the tiles of one slice are consecutive
items, run side by side by neighbouring programs (`_work_item`). Splitting
each expert over I (or H) gives enough work items for few experts to keep every SM pulling
bandwidth.

FP8 experts (issue 16): every weight-reading kernel takes an optional `s_ptr`, the fp32 block
scales of fine-grained FP8 checkpoints (`weight_scale_inv`: one per SCALE_N x SCALE_K block of
an expert's [N, K] matrix, dequantized W = W_fp8 * scale). None (the default) compiles the
plain path unchanged. Given, the k loops are kernels/moe_fp8.py's: e4m3 tiles (1 byte an
element) as the left operand of a transposed product, each k step's product scaled in fp32, and
with DOT "fp8" an e4m3 dot (activations quantized per row and group, W8A8) or "fp16" an fp16
dot (activations scaled per row by a power of two, exactly), the act rows between gate/up and
down in that type with per-row scales in `act_scale_ptr`. FP8_BITS reads the
weights as uint8 bytes and decodes them with integer ops, for GPUs whose Triton has no e4m3
type (< sm_89).
"""
import triton
import triton.language as tl

from .moe_fp8 import fp8_down_step, fp8_silu_gate_up, fp8_store_act
from .pdl import wait_previous_kernel


@triton.jit
def _bucket(ids, n_routed, E):
    """A routed slot's bucket: its expert, or E (the empty bucket) for an empty slot (-1) or an
    id outside [0, n_routed). The range test runs in the ids' own dtype: an int64 id such as
    2**32 + 1 is out of range, not expert 1."""
    return tl.where((ids >= 0) & (ids < n_routed), ids, E).to(tl.int32)


@triton.jit
def _routed_at(token, j, TOP_K, SHARED: tl.constexpr):
    """Slot j of `token` in the lists' layout [T, TOP_K]: whether it is a routed slot, and
    where its id and weight lie in the routing's ids and weights [T, TOP_K - SHARED]. With
    SHARED each token's last slot is the shared expert's (expert E - 1 of the lists, weight 1),
    which no tensor holds: a virtual slot, so the shared expert costs no torch op on the hot
    path. `routed` has token's shape even for a scalar j, so that ~routed is a boolean not
    under the interpreter too (there a Python bool's ~ is an integer)."""
    return j + 0 * token < TOP_K - SHARED, token * (TOP_K - SHARED) + j


@triton.jit
def _routed_slot(slots, TOP_K, SHARED: tl.constexpr):
    """_routed_at for slot numbers of the lists' layout (token = slot // TOP_K).

    In int32 (slot numbers are, as the lists are): an int64 division took the grouped down
    from 120 to 186 registers a thread at 64-slot tiles, one program per SM instead of two,
    and the down 2.2x slower on the H200 (tenth session)."""
    slots = slots.to(tl.int32)
    routed = slots >= 0
    at = slots
    if SHARED:  # without a shared slot the layouts agree: no division
        token = slots // TOP_K
        routed, at = _routed_at(token, slots - token * TOP_K, TOP_K, SHARED)
    return routed, at


@triton.jit
def _chunk_buckets(ids_ptr, S, E, TOP_K, chunk, CHUNK: tl.constexpr, SHARED: tl.constexpr):
    """The chunk's slot numbers and their buckets: a routed slot's _bucket (among the E - SHARED
    routed experts), a shared slot's E - 1 (_routed_slot); the padding past S, which the
    scatter never stores, is empty."""
    slots = chunk * CHUNK + tl.arange(0, CHUNK)
    in_range = slots < S
    routed, at = _routed_slot(slots, TOP_K, SHARED)
    ids = tl.load(ids_ptr + at, mask=in_range & routed, other=-1)
    return slots, tl.where(in_range & ~routed, E - 1, _bucket(ids, E - SHARED, E))


@triton.jit
def align_count_kernel(ids_ptr, chunk_counts_ptr, S, E, TOP_K, CHUNK: tl.constexpr,
                       NUM_BINS: tl.constexpr, SHARED: tl.constexpr = False,
                       PDL: tl.constexpr = False):
    """Align, step 1 of 3 (a counting sort of the slots by expert): chunk_counts_ptr int32
    [cdiv(S, CHUNK), NUM_BINS] row c = the histogram of chunk c's buckets. The S = T * TOP_K
    slots: ids_ptr int32/int64 [T, TOP_K - SHARED] (-1 or out of range = empty), and with SHARED
    each token's last slot the shared expert's, expert E - 1 (_routed_at); NUM_BINS =
    next_power_of_2(E + 1). Grid (chunks,)."""
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    chunk = tl.program_id(0)
    _, bucket = _chunk_buckets(ids_ptr, S, E, TOP_K, chunk, CHUNK, SHARED)
    tl.store(chunk_counts_ptr + chunk * NUM_BINS + tl.arange(0, NUM_BINS),
             tl.histogram(bucket, NUM_BINS))


@triton.jit
def align_lists_kernel(chunk_counts_ptr, n_chunks, used_expert_ptr, used_start_ptr,
                       used_count_ptr, n_used_ptr, used_tile_ptr, n_tiles_ptr, E,
                       BLOCK_M: tl.constexpr, NUM_BINS: tl.constexpr, ROWS: tl.constexpr,
                       PDL: tl.constexpr = False):
    """Align, step 2 of 3 (one program): from the chunks' histograms, the used experts in
    expert order: used_expert/used_start/used_count_ptr int32 [E] (first n_used entries
    written), n_used_ptr int32 [1]; used_tile_ptr int32 [E]: each used expert's first
    BLOCK_M-slot tile in one numbering of all used experts' tiles (entries from n_used on:
    n_tiles), n_tiles_ptr int32 [1]: their count. Then chunk_counts_ptr is overwritten in place
    with each chunk's first place per bucket in the sorted order (its bucket's start plus the
    bucket's slots in earlier chunks; the empty bucket E last), so the scatter step reads one
    value per slot. ROWS: chunks per loop step (two passes over the chunks: O(chunks x bins))."""
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    bins = tl.arange(0, NUM_BINS)
    counts = tl.zeros((NUM_BINS,), tl.int32)
    for c0 in range(0, n_chunks, ROWS):
        rows = c0 + tl.arange(0, ROWS)
        counts += tl.sum(tl.load(chunk_counts_ptr + rows[:, None] * NUM_BINS + bins[None, :],
                                 mask=(rows < n_chunks)[:, None], other=0), 0)
    used = (bins < E) & (counts > 0)
    rank = tl.cumsum(used.to(tl.int32), 0) - 1
    starts = tl.cumsum(counts, 0) - counts
    tiles = tl.where(used, tl.cdiv(counts, BLOCK_M), 0)
    first_tiles = tl.cumsum(tiles, 0) - tiles
    n_used = tl.sum(used.to(tl.int32), 0)
    n_tiles = tl.sum(tiles, 0)
    tl.store(used_expert_ptr + rank, bins, mask=used)
    tl.store(used_start_ptr + rank, starts, mask=used)
    tl.store(used_count_ptr + rank, counts, mask=used)
    tl.store(used_tile_ptr + rank, first_tiles, mask=used)
    tl.store(used_tile_ptr + bins, n_tiles + 0 * bins, mask=(bins >= n_used) & (bins < E))
    tl.store(n_used_ptr, n_used)
    tl.store(n_tiles_ptr, n_tiles)
    placed = starts  # per bucket: its slots placed by the chunks before the current rows
    for c0 in range(0, n_chunks, ROWS):
        rows = c0 + tl.arange(0, ROWS)
        tile_ptrs = chunk_counts_ptr + rows[:, None] * NUM_BINS + bins[None, :]
        tile = tl.load(tile_ptrs, mask=(rows < n_chunks)[:, None], other=0)
        tl.store(tile_ptrs, placed[None, :] + tl.cumsum(tile, 0) - tile,
                 mask=(rows < n_chunks)[:, None])
        placed += tl.sum(tile, 0)


@triton.jit
def align_scatter_kernel(ids_ptr, chunk_first_ptr, sorted_slots_ptr, S, E, TOP_K,
                         CHUNK: tl.constexpr, NUM_BINS: tl.constexpr,
                         SHARED: tl.constexpr = False, PDL: tl.constexpr = False):
    """Align, step 3 of 3: sorted_slots_ptr int32 [S] = the slots by bucket, then by slot
    number (deterministic: no atomics). A slot's place is its chunk's first place for its
    bucket (chunk_first_ptr: align_lists_kernel's rewrite of the counts) plus the slots of its
    bucket before it in its chunk. ids_ptr, TOP_K, SHARED as in align_count_kernel. Grid
    (chunks,)."""
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    chunk = tl.program_id(0)
    slots, bucket = _chunk_buckets(ids_ptr, S, E, TOP_K, chunk, CHUNK, SHARED)
    local = tl.arange(0, CHUNK)
    before = (bucket[:, None] == bucket[None, :]) & (local[None, :] < local[:, None])
    place = tl.load(chunk_first_ptr + chunk * NUM_BINS + bucket) + tl.sum(before.to(tl.int32), 1)
    tl.store(sorted_slots_ptr + place, slots, mask=slots < S)


@triton.jit
def _work_item(item, n_splits, used_expert_ptr, used_start_ptr, used_count_ptr, used_tile_ptr,
               E, BLOCK_M: tl.constexpr, USED_PAD: tl.constexpr):
    """Work item -> (expert, its first sorted slot, its slot count, which split, the item's
    tile's first slot within the expert's).

    Items are numbered expert by expert, then split by split, then tile by tile, so the tiles
    of one (expert, split) are consecutive items, which the persistent loop hands to
    neighbouring programs in the same round: one read of the weight slice into L2 serves all of
    the expert's tokens. (A loop over the tiles inside one item re-read the slice after every
    other program had streamed its own slice through L2, i.e. from HBM.)
    """
    tile = item // n_splits  # a tile number of the item's expert (used_tile ascends)
    pads = tl.arange(0, USED_PAD)
    firsts = tl.load(used_tile_ptr + pads, mask=pads < E, other=2147483647)
    owned = firsts <= tile
    u = tl.sum(owned.to(tl.int32), 0) - 1
    first_tile = tl.max(tl.where(owned, firsts, 0), 0)
    count = tl.load(used_count_ptr + u)
    tiles = tl.cdiv(count, BLOCK_M)
    local = item - first_tile * n_splits
    expert = tl.load(used_expert_ptr + u).to(tl.int64)
    return (expert, tl.load(used_start_ptr + u), count, local // tiles,
            (local % tiles) * BLOCK_M)


@triton.jit
def _weights_of(expert, shared_id, base_ptr, stride_e, shared_ptr):
    """Where expert `expert`'s weights (or scales) start: base_ptr + expert * stride_e, or,
    with a shared expert (shared_ptr given: the routed experts' layout without the expert dim),
    shared_ptr for the id it runs under, shared_id: E on the decode path (listed after the E
    routed experts), E - 1 on the grouped path (its lists count it among E experts:
    every token's last slot is its, a virtual one: _routed_at)."""
    rows = base_ptr + expert * stride_e
    if shared_ptr is not None:
        rows = tl.where(expert == shared_id, shared_ptr, rows)
    return rows


@triton.jit
def _tile_slots(sorted_slots_ptr, start, count, m0, BLOCK_M: tl.constexpr):
    """The expert's slots m0 .. m0 + BLOCK_M (masked past its count)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < count
    return tl.load(sorted_slots_ptr + start + offs_m, mask=m_ok, other=0).to(tl.int64), m_ok


@triton.jit
def _silu_gate_up_t(x_cols, cols_ok, stride_xh, w_gate, w_up, stride_wk, i_ok, H,
                    ROWS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr):
    """silu(x W_gate^T) * (x W_up^T) transposed: [BLOCK_I, ROWS] fp32, weights on the left.

    ROWS token rows and BLOCK_I columns. x_cols [1, ROWS] points at each token row's first
    element; columns outside `cols_ok` are masked, so they cost no memory traffic. w_gate / w_up
    [BLOCK_I, 1] point at the columns' weight rows. The weight tile fills the MMA's M side (64
    rows and more: Hopper's wgmma), the tokens its N side (8 and up), where x @ W^T would put
    the tokens on M and take mma.sync (docs/moe.md: measured on both paths).
    """
    acc_gate = tl.zeros((BLOCK_I, ROWS), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_I, ROWS), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        x_t = tl.load(x_cols + offs_k[:, None] * stride_xh, mask=k_ok[:, None] & cols_ok[None, :],
                      other=0.0)
        w_mask = i_ok[:, None] & k_ok[None, :]
        gate = tl.load(w_gate + offs_k[None, :] * stride_wk, mask=w_mask, other=0.0)
        acc_gate = tl.dot(gate, x_t, acc_gate, input_precision=PRECISION)
        up = tl.load(w_up + offs_k[None, :] * stride_wk, mask=w_mask, other=0.0)
        acc_up = tl.dot(up, x_t, acc_up, input_precision=PRECISION)
    return acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up


@triton.jit
def moe_gate_up_kernel(x_ptr, stride_xt, stride_xh,
                       w_ptr, stride_we, stride_wn, stride_wk,
                       act_ptr, stride_as,
                       sorted_slots_ptr, used_expert_ptr, used_start_ptr, used_count_ptr,
                       used_tile_ptr, n_tiles_ptr, H, I, E, TOP_K,
                       BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr, USED_PAD: tl.constexpr,
                       s_ptr=None, stride_se=0, stride_sn=0, stride_sk=0,
                       SCALE_N: tl.constexpr = 128, SCALE_K: tl.constexpr = 128,
                       FP8_BITS: tl.constexpr = False, act_scale_ptr=None, stride_ss=0,
                       DOT: tl.constexpr = "model", x_inverse_ptr=None, stride_xi=0,
                       shared_ptr=None, shared_s_ptr=None, PDL: tl.constexpr = False):
    """act[slot] = silu(x W_gate^T) * (x W_up^T) for the used experts' slots (persistent).

    x_ptr [T, H] (strides in elements); w_ptr [E, 2I, H] (gate rows, then up rows); act_ptr
    [T*TOP_K, I] out, x's dtype; the align's lists (E experts; USED_PAD:
    next_power_of_2(E)). H, I: sizes; TOP_K: slots per token (runtime). BLOCK_M: slots per
    tile; BLOCK_I: act columns per work item; BLOCK_K: reduction step along H; PRECISION:
    tl.dot input_precision. s_ptr: fp32 [E, 2 * cdiv(I, SCALE_N), cdiv(H, SCALE_K)] block
    scales of FP8 weights (gate blocks, then up blocks), or None; FP8_BITS: w_ptr holds e4m3
    bytes as uint8; DOT "fp8" / "fp16": the dot's operand type (moe_fp8.py), act_ptr e4m3 /
    fp16 and act_scale_ptr fp32 [T*TOP_K, cdiv(I, BLOCK_I)] its per-row inverse scales;
    x_inverse_ptr: fp32 [T, cdiv(H, SCALE_K)] when x_ptr holds scaled_rows_kernel's rows, or
    None. shared_ptr [2I, H] (shared_s_ptr its FP8 scales), or None: a shared expert, which is
    expert E - 1 of the lists (_weights_of), in the routed experts' strides.
    """
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    n_splits = tl.cdiv(I, BLOCK_I)
    n_items = tl.load(n_tiles_ptr) * n_splits
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        expert, start, count, split, m0 = _work_item(
            item, n_splits, used_expert_ptr, used_start_ptr, used_count_ptr, used_tile_ptr, E,
            BLOCK_M, USED_PAD)
        offs_i = split * BLOCK_I + tl.arange(0, BLOCK_I)
        w_rows = _weights_of(expert, E - 1, w_ptr, stride_we, shared_ptr)
        slot, m_ok = _tile_slots(sorted_slots_ptr, start, count, m0, BLOCK_M)
        token = slot // TOP_K
        if s_ptr is None:
            w_gate = w_rows + offs_i[:, None] * stride_wn
            act_t = _silu_gate_up_t(x_ptr + token[None, :] * stride_xt, m_ok, stride_xh, w_gate,
                                    w_gate + I * stride_wn, stride_wk, offs_i < I, H, BLOCK_M,
                                    BLOCK_I, BLOCK_K, PRECISION)
            tl.store(act_ptr + slot[None, :] * stride_as + offs_i[:, None],
                     act_t.to(act_ptr.dtype.element_ty),
                     mask=m_ok[None, :] & (offs_i < I)[:, None])
        else:
            x_inverse = None
            if x_inverse_ptr is not None:
                x_inverse = x_inverse_ptr + token[None, :] * stride_xi
            act_t = fp8_silu_gate_up(x_ptr + token[None, :] * stride_xt, x_inverse, m_ok,
                                     stride_xh, w_rows, stride_wn, stride_wk, split * BLOCK_I,
                                     offs_i, H,
                                     _weights_of(expert, E - 1, s_ptr, stride_se, shared_s_ptr), I,
                                     stride_sn, stride_sk, BLOCK_M, BLOCK_I, BLOCK_K, PRECISION,
                                     SCALE_N, SCALE_K, FP8_BITS, DOT)
            fp8_store_act(act_t, act_ptr, stride_as, act_scale_ptr, stride_ss, slot, m_ok,
                          split * BLOCK_I, offs_i, I, BLOCK_I, DOT)


@triton.jit
def moe_down_kernel(act_ptr, stride_as,
                    w_ptr, stride_we, stride_wh, stride_wi,
                    partial_ptr, stride_ps, weights_ptr,
                    sorted_slots_ptr, used_expert_ptr, used_start_ptr, used_count_ptr,
                    used_tile_ptr, n_tiles_ptr, H, I, E, TOP_K,
                    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr, USED_PAD: tl.constexpr, SHARED: tl.constexpr = False,
                    s_ptr=None, stride_se=0, stride_sn=0, stride_sk=0,
                    SCALE_N: tl.constexpr = 128, SCALE_K: tl.constexpr = 128,
                    FP8_BITS: tl.constexpr = False, act_scale_ptr=None, stride_ss=0,
                    ACT_CHUNK: tl.constexpr = 128, DOT: tl.constexpr = "model",
                    shared_ptr=None, shared_s_ptr=None, PDL: tl.constexpr = False):
    """partial[slot] = w * act[slot] W_down^T for the used experts' slots (persistent), w the
    slot's routing weight (1 for the shared expert's: _routed_slot): the product in fp32,
    rounded once to partial's dtype.

    act_ptr [T*TOP_K, I]; w_ptr [E, H, I] (strides in elements); partial_ptr [T*TOP_K, H] out
    (the layer output's dtype); weights_ptr fp32 [T, TOP_K - SHARED] the routed slots' routing
    weights (SHARED: each token's last slot is the shared expert's, weight 1: _routed_at);
    the align's lists (E, USED_PAD as in moe_gate_up_kernel). BLOCK_M: slots per
    tile; BLOCK_H: hidden columns per work item; BLOCK_K: reduction step along I; PRECISION:
    tl.dot input_precision. s_ptr: fp32 [E, cdiv(H, SCALE_N), cdiv(I, SCALE_K)] block scales
    of FP8 weights, or None; FP8_BITS, DOT as in moe_gate_up_kernel; act_scale_ptr [T*TOP_K,
    cdiv(I, ACT_CHUNK)]: its act scales (ACT_CHUNK: the gate/up's BLOCK_I; a k step is
    min(BLOCK_K, ACT_CHUNK)-wide dots: moe_fp8.fp8_down_step). shared_ptr [H, I],
    shared_s_ptr: as in moe_gate_up_kernel.
    """
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    n_splits = tl.cdiv(H, BLOCK_H)
    n_items = tl.load(n_tiles_ptr) * n_splits
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        expert, start, count, split, m0 = _work_item(
            item, n_splits, used_expert_ptr, used_start_ptr, used_count_ptr, used_tile_ptr, E,
            BLOCK_M, USED_PAD)
        offs_h = split * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        slot, m_ok = _tile_slots(sorted_slots_ptr, start, count, m0, BLOCK_M)
        w_rows = (_weights_of(expert, E - 1, w_ptr, stride_we, shared_ptr)
                  + offs_h[:, None] * stride_wh)
        acc_t = tl.zeros((BLOCK_H, BLOCK_M), dtype=tl.float32)
        if s_ptr is None:
            for k0 in range(0, I, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < I
                a_t = tl.load(act_ptr + slot[None, :] * stride_as + offs_k[:, None],
                              mask=k_ok[:, None] & m_ok[None, :], other=0.0)
                w = tl.load(w_rows + offs_k[None, :] * stride_wi, mask=h_ok[:, None]
                            & k_ok[None, :], other=0.0)
                acc_t = tl.dot(w, a_t, acc_t, input_precision=PRECISION)
        else:
            s_rows = _weights_of(expert, E - 1, s_ptr, stride_se, shared_s_ptr)
            for k0 in range(0, I, BLOCK_K):
                acc_t = fp8_down_step(act_ptr, stride_as, act_scale_ptr, stride_ss, slot,
                                      m_ok, 1.0, k0, I, acc_t, w_rows, stride_wi,
                                      split * BLOCK_H, offs_h, s_rows, stride_sn, stride_sk, H,
                                      BLOCK_K, PRECISION, SCALE_N, SCALE_K, BLOCK_H, ACT_CHUNK,
                                      FP8_BITS, DOT)
        # The routing weight here, before the rounding to partial's dtype: the rounded
        # term is the one the combine adds (a NaN weight makes the slot's partial NaN).
        routed, at = _routed_slot(slot, TOP_K, SHARED)
        weight = tl.load(weights_ptr + at, mask=m_ok & routed, other=1.0)  # shared: 1
        tl.store(partial_ptr + slot[None, :] * stride_ps + offs_h[:, None],
                 (acc_t * weight[None, :]).to(partial_ptr.dtype.element_ty),
                 mask=m_ok[None, :] & h_ok[:, None])


@triton.jit
def _combine_slot(acc, any_filled, all_nan, partial_ptr, stride_ps, ids_ptr, weights_ptr,
                  offs_t, offs_h, t_ok, h_ok, j, E, TOP_K: tl.constexpr, SHARED: tl.constexpr):
    """Slot j of every token of the tile added to acc (see moe_combine_kernel)."""
    slot_ok = t_ok & (j < TOP_K)
    token = offs_t.to(tl.int64)
    routed, at = _routed_at(token, j, TOP_K, SHARED)
    slot = token * TOP_K + j
    expert = tl.load(ids_ptr + at, mask=slot_ok & routed, other=-1)
    weight = tl.load(weights_ptr + at, mask=slot_ok & routed, other=0.0)
    # a routed slot is filled where the align gave it an expert's bucket (_bucket)
    filled = slot_ok & ((_bucket(expert, E - SHARED, E) < E) | ~routed)
    any_filled = any_filled | (filled & routed)  # the NaN rule reads the routed slots only
    # padding slots past TOP_K and the shared slot: no say
    all_nan = all_nan & ((weight != weight) | ~slot_ok | ~routed)
    part = tl.load(partial_ptr + slot[:, None] * stride_ps + offs_h[None, :],
                   mask=filled[:, None] & h_ok[None, :], other=0.0)
    # Only filled slots' partials were written (weighted there); an empty slot adds nothing.
    acc += tl.where(filled[:, None], part.to(tl.float32), 0.0)
    return acc, any_filled, all_nan


@triton.jit
def moe_combine_kernel(partial_ptr, stride_ps, ids_ptr, weights_ptr, out_ptr, stride_ot,
                       T, H, E, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                       UNROLL: tl.constexpr, SHARED: tl.constexpr = False,
                       PDL: tl.constexpr = False):
    """out[t] = sum_j partial[t*TOP_K + j] over filled slots, j in order, in fp32.

    partial_ptr [T*TOP_K, H]: the down's weighted terms; ids_ptr int [T, TOP_K - SHARED]
    (outside [0, E - SHARED) = empty); weights_ptr fp32 [T, TOP_K - SHARED], read for the NaN
    rule alone; out_ptr [T, H] (row stride stride_ot). Grid (cdiv(T, BLOCK_T), cdiv(H,
    BLOCK_H)). UNROLL: slots unrolled per loop step (CombineLaunch.unroll; the sum's order, slot
    order, does not depend on it). SHARED: each token's last slot is the shared expert's
    (expert E - 1, weight 1, held in no tensor: _routed_at), which the NaN rule below does
    not read.
    """
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = offs_t < T
    h_ok = offs_h < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    any_filled = offs_t < 0
    all_nan = offs_t >= 0
    if TOP_K <= UNROLL:
        for j in tl.static_range(TOP_K):  # unrolled: the k partial loads are in flight together
            acc, any_filled, all_nan = _combine_slot(
                acc, any_filled, all_nan, partial_ptr, stride_ps, ids_ptr, weights_ptr, offs_t,
                offs_h, t_ok, h_ok, j, E, TOP_K, SHARED)
    else:
        for j0 in range(0, TOP_K, UNROLL):
            for jj in tl.static_range(UNROLL):
                acc, any_filled, all_nan = _combine_slot(
                    acc, any_filled, all_nan, partial_ptr, stride_ps, ids_ptr, weights_ptr,
                    offs_t, offs_h, t_ok, h_ok, j0 + jj, E, TOP_K, SHARED)
    # NaN rule (docs/routing.md): a NaN weight in a filled slot makes NaN above; a token with
    # every routed slot empty and every routed weight NaN (route's all-NaN logits row) is NaN
    # too, not 0 or the shared expert alone; with no routed slot at all (top_k 0) no row is.
    nan_rows = ~any_filled & all_nan & (TOP_K > SHARED)
    acc = tl.where(nan_rows[:, None], float("nan"), acc)
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + offs_h[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & h_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Decode path (few tokens, e.g. one 32-token block): two launches, no align step, no partials.
# Every gate/up program derives the used experts from the ids itself (a histogram of T*k ids
# costs less than a launch) and lists them for the down; an expert's act rows are u * T_PAD + t,
# one for every token (zeros where t does not use it).
# ---------------------------------------------------------------------------------------------

@triton.jit
def _expert_buckets(ids_ptr, S, E, S_PAD: tl.constexpr, NUM_BINS: tl.constexpr):
    """Each slot's bucket (its expert; E for empty slots, out-of-range ids and padding) and the
    used experts: counts per bin, `used` mask, and each used expert's rank among them."""
    slots = tl.arange(0, S_PAD)
    bucket = _bucket(tl.load(ids_ptr + slots, mask=slots < S, other=-1), E, E)
    counts = tl.histogram(bucket, NUM_BINS)
    used = (tl.arange(0, NUM_BINS) < E) & (counts > 0)
    rank = tl.cumsum(used.to(tl.int32), 0) - 1
    return bucket, counts, used, rank


@triton.jit
def _nth_used_expert(used, rank, u, NUM_BINS: tl.constexpr):
    return tl.sum(tl.where(used & (rank == u), tl.arange(0, NUM_BINS), 0), 0)


@triton.jit
def _token_ids(ids_ptr, T, TOP_K, T_PAD: tl.constexpr, TOP_K_PAD: tl.constexpr):
    t = tl.arange(0, T_PAD)[:, None]
    j = tl.arange(0, TOP_K_PAD)[None, :]
    mask = (t < T) & (j < TOP_K)
    return tl.load(ids_ptr + t * TOP_K + j, mask=mask, other=-1), mask


@triton.jit
def _token_weights(weights_ptr, id_mask, TOP_K, T_PAD: tl.constexpr, TOP_K_PAD: tl.constexpr):
    """The routing weights [T_PAD, TOP_K_PAD] fp32 of _token_ids' slots (0 outside id_mask)."""
    t = tl.arange(0, T_PAD)[:, None]
    j = tl.arange(0, TOP_K_PAD)[None, :]
    return tl.load(weights_ptr + t * TOP_K + j, mask=id_mask, other=0.0)


@triton.jit
def _decode_item_rows(u, used, rank, n_used, token_ids, T, E, T_PAD: tl.constexpr,
                      NUM_BINS: tl.constexpr, HAS_SHARED: tl.constexpr):
    """The u-th used expert of a decode launch (with HAS_SHARED, u == n_used is the shared
    expert, listed as expert E) and its tokens: (expert, hit [T_PAD, TOP_K_PAD]: the slots that
    name it, uses [T_PAD]: the tokens that use it (the shared expert: every real token),
    shared)."""
    expert = _nth_used_expert(used, rank, u, NUM_BINS)
    hit = token_ids == expert
    uses = tl.max(hit.to(tl.int32), 1) > 0
    shared = u == n_used
    if HAS_SHARED:
        uses = tl.where(shared, tl.arange(0, T_PAD) < T, uses)
        expert = tl.where(shared, E, expert)
    return expert, hit, uses, shared


@triton.jit
def _row_weights(hit, uses, shared, token_weights, HAS_SHARED: tl.constexpr):
    """Each token's routing weight for an item's expert, fp32 [T_PAD]: the sum of its slots'
    weights that name the expert (a token that lists it twice gets both), 0 where it does not
    use it; the shared expert's: 1 for every real token (`uses`)."""
    row_weight = tl.sum(tl.where(hit, token_weights, 0.0), 1)
    if HAS_SHARED:
        row_weight = tl.where(shared, uses.to(tl.float32), row_weight)
    return row_weight


@triton.jit
def _gate_up_columns(x_ptr, stride_xt, stride_xh, w_ptr, stride_we, stride_wn, stride_wk,
                     shared_ptr, act_ptr, stride_as, used_ptr, row_weight_ptr,
                     used, rank, n_used, token_ids, token_weights, u, i0, T, H, I, E,
                     T_PAD: tl.constexpr, NUM_BINS: tl.constexpr,
                     HAS_SHARED: tl.constexpr, COLS: tl.constexpr, BLOCK_K: tl.constexpr,
                     PRECISION: tl.constexpr, WEIGHED_ACT: tl.constexpr):
    """act[u * T_PAD + t, i0 .. i0 + COLS] of the u-th used expert (_decode_item_rows),
    model-dtype weights, for every token row t (zeros where t does not use the expert: its x
    row is masked and its routing weight 0): a whole work item of moe_gate_up_decode_kernel or a
    piece of one. So the down finds an expert's act tile from u alone (no per-token table of act
    rows to load first). The expert's first columns also write what the down launch reads of
    it: used_ptr[u] (E: the shared expert), and the routing weights row_weight_ptr[u, t]
    (_row_weights) for the FP8 down and the tests."""
    expert, hit, uses, shared = _decode_item_rows(u, used, rank, n_used, token_ids, T, E, T_PAD,
                                                  NUM_BINS, HAS_SHARED)
    t = tl.arange(0, T_PAD)
    row_weight = _row_weights(hit, uses, shared, token_weights, HAS_SHARED)
    if i0 == 0:
        tl.store(used_ptr + u, expert)
        tl.store(row_weight_ptr + u * T_PAD + t, row_weight)
    w_rows = _weights_of(expert.to(tl.int64), E, w_ptr, stride_we, shared_ptr)
    offs_i = i0 + tl.arange(0, COLS)
    w_gate = w_rows + offs_i[:, None] * stride_wn
    act_t = _silu_gate_up_t(x_ptr + t.to(tl.int64)[None, :] * stride_xt, uses, stride_xh,
                            w_gate, w_gate + I * stride_wn, stride_wk, offs_i < I, H, T_PAD,
                            COLS, BLOCK_K, PRECISION)
    # WEIGHED_ACT: the act rows are weighed here, so that the down's loop is a plain sum of
    # products (_down_shares); fp16 rows are not (a weighed row could pass fp16's 65504 where
    # the unweighed one does not): the down weighs their products. A token that does not use
    # the expert gets zeros, not its zero x row's products times 0: those are NaN where the
    # expert's weights hold an inf.
    if WEIGHED_ACT:
        act_t = act_t * row_weight[None, :]
    act_t = tl.where(uses[None, :], act_t, 0.0)
    rows = (u * T_PAD + t).to(tl.int64)
    tl.store(act_ptr + rows[None, :] * stride_as + offs_i[:, None],
             act_t.to(act_ptr.dtype.element_ty), mask=(offs_i < I)[:, None])


@triton.jit
def _whole_items(n_items, programs, TAIL_SPLIT: tl.constexpr):
    """How many of a decode gate/up's n_items work items run whole; the rest are cut into
    TAIL_SPLIT pieces each. Past one full wave (more items than programs), the last, partial
    wave's items are cut when their pieces make at most one more wave: whole, the few programs
    that take one more item set the launch's time (at 16 coreset experts and the shared one,
    136 items on 132 SMs). A second wave of pieces was slower than whole items (narrow tiles,
    launch.py)."""
    n_whole = n_items
    if TAIL_SPLIT > 1:
        rest = n_items % programs
        n_whole = tl.where((n_items > programs) & (rest * TAIL_SPLIT <= programs),
                           n_items - rest, n_items)
    return n_whole


@triton.jit
def _fp8_decode_item(x_ptr, stride_xt, stride_xh, x_inverse_ptr, stride_xi, w_ptr, stride_we,
                     stride_wn, stride_wk, shared_ptr, s_ptr, stride_se, stride_sn, stride_sk,
                     shared_s_ptr, act_ptr, stride_as, act_scale_ptr, stride_ss, used_ptr,
                     row_weight_ptr, used, rank, n_used, token_ids, token_weights, u, i0, T, H,
                     I, E, T_PAD: tl.constexpr, NUM_BINS: tl.constexpr,
                     HAS_SHARED: tl.constexpr, BLOCK_I: tl.constexpr,
                     BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, SCALE_N: tl.constexpr,
                     SCALE_K: tl.constexpr, FP8_BITS: tl.constexpr, DOT: tl.constexpr,
                     TMA: tl.constexpr = False):
    """One FP8 work item of moe_gate_up_decode_kernel (the u-th used expert, _decode_item_rows,
    columns i0 ..): its weights and scales, its tokens, and each token's routing weight for it
    (row_weight [T_PAD] fp32, 0 where unused; 1 for every real token of the shared expert).

    Its act rows are u * T_PAD + t, every token row (zeros where t does not use the expert),
    so that the down launch reads them at addresses that follow from u alone; its first column
    block also lists `expert` (used_ptr[u]: the expert id, E for the shared expert) and the
    row weights (row_weight_ptr[u, t]). With TMA its gate/up tiles come through a tensor
    descriptor of the expert's weights made here (launch.takes_tma's conditions; on a GPU,
    Triton's allocator must be set for the descriptor's scratch: moe._with_descriptor_scratch).
    """
    expert, hit, uses, shared = _decode_item_rows(u, used, rank, n_used, token_ids, T, E, T_PAD,
                                                  NUM_BINS, HAS_SHARED)
    w_rows = _weights_of(expert.to(tl.int64), E, w_ptr, stride_we, shared_ptr)
    s_expert = _weights_of(expert.to(tl.int64), E, s_ptr, stride_se, shared_s_ptr)
    t = tl.arange(0, T_PAD)
    if i0 == 0:
        tl.store(used_ptr + u, expert)
        tl.store(row_weight_ptr + u * T_PAD + t,
                 _row_weights(hit, uses, shared, token_weights, HAS_SHARED))
    offs_i = i0 + tl.arange(0, BLOCK_I)
    x_inverse = None
    if x_inverse_ptr is not None:
        x_inverse = x_inverse_ptr + t.to(tl.int64)[None, :] * stride_xi
    w = w_rows
    if TMA:  # the expert's [2I, H] weights as a tensor descriptor (DecodeConfig.tma)
        w = tl.make_tensor_descriptor(w_rows, shape=[2 * I, H], strides=[stride_wn, 1],
                                      block_shape=[BLOCK_I, BLOCK_K])
    act_t = fp8_silu_gate_up(x_ptr + t.to(tl.int64)[None, :] * stride_xt, x_inverse, uses,
                             stride_xh, w, stride_wn, stride_wk, i0, offs_i, H, s_expert, I,
                             stride_sn, stride_sk, T_PAD, BLOCK_I, BLOCK_K, PRECISION, SCALE_N,
                             SCALE_K, FP8_BITS, DOT, TMA)
    fp8_store_act(act_t, act_ptr, stride_as, act_scale_ptr, stride_ss,
                  (u * T_PAD + t).to(tl.int64), t >= 0, i0, offs_i, I, BLOCK_I, DOT)


@triton.jit
def moe_gate_up_decode_kernel(x_ptr, stride_xt, stride_xh, w_ptr, stride_we, stride_wn,
                              stride_wk, act_ptr, stride_as, ids_ptr, arrivals_ptr, n_arrivals,
                              shared_ptr, T, H, I, E, TOP_K,
                              T_PAD: tl.constexpr, TOP_K_PAD: tl.constexpr, S_PAD: tl.constexpr,
                              NUM_BINS: tl.constexpr, BLOCK_I: tl.constexpr,
                              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                              HAS_SHARED: tl.constexpr,
                              s_ptr=None, stride_se=0, stride_sn=0, stride_sk=0,
                              SCALE_N: tl.constexpr = 128, SCALE_K: tl.constexpr = 128,
                              FP8_BITS: tl.constexpr = False, act_scale_ptr=None, stride_ss=0,
                              DOT: tl.constexpr = "model", x_inverse_ptr=None, stride_xi=0,
                              weights_ptr=None, used_ptr=None, row_weight_ptr=None,
                              shared_s_ptr=None, TAIL_SPLIT: tl.constexpr = 1,
                              TAIL_K: tl.constexpr = 128, WEIGHED_ACT: tl.constexpr = False,
                              TMA: tl.constexpr = False, PDL: tl.constexpr = False):
    """act[u * T_PAD + t] = w * silu(x_t W_gate^T) * (x_t W_up^T) for the u-th used expert (0
    where t does not use it), w token t's routing weight with WEIGHED_ACT (bf16 / fp32 act rows:
    _gate_up_columns), else 1 (fp16 rows, FP8 weights: the down weighs the products); work
    item = (used expert, BLOCK_I columns).

    With HAS_SHARED, the shared expert (gate|up rows at shared_ptr, the routed experts' strides)
    is one more expert after the used ones (u = n_used, listed as expert E), used by every token
    with weight 1 (FP8 weights: its scales at shared_s_ptr). Also zeroes the down launch's
    `n_arrivals` arrival counters (saves a memset launch).

    x_ptr [T, H]; w_ptr [E, 2I, H] (strides in elements); act_ptr [U * T_PAD, I] out;
    ids_ptr int [T, TOP_K] contiguous (-1 = empty); arrivals_ptr int32 [n_arrivals] or None;
    used_ptr int32 [U + 1] out, U = min(E, T*TOP_K) + HAS_SHARED: the used experts in rank
    order (E: the shared expert), for the down launch, and used_ptr[U] their number;
    shared_ptr [2I, H] or None (without HAS_SHARED). T_PAD >= 16, TOP_K_PAD, S_PAD, NUM_BINS:
    powers of two >= T, TOP_K, T*TOP_K, E + 1. BLOCK_I: act columns per work item; BLOCK_K:
    reduction step along H; PRECISION: tl.dot input_precision. s_ptr, SCALE_N/K, FP8_BITS,
    act_scale_ptr, DOT, x_inverse_ptr: FP8 weights as in moe_gate_up_kernel, shared_s_ptr the
    FP8 shared expert's [2 * cdiv(I, SCALE_N), cdiv(H, SCALE_K)] (the routed experts'
    strides) (_fp8_decode_item). weights_ptr fp32 [T, TOP_K]: the routing weights; out, for the
    down of unweighed rows, row_weight_ptr fp32 [U, T_PAD] (_row_weights). TAIL_SPLIT: pieces
    per item of the last, partial wave (1: whole items; model-dtype weights only, BLOCK_I //
    TAIL_SPLIT >= 16), and TAIL_K their reduction step along H. TMA: _fp8_decode_item's."""
    tl.static_assert(weights_ptr is not None, "weights_ptr: the routing weights are required")
    tl.static_assert(not TMA or s_ptr is not None, "TMA reads FP8 weights only")
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    if arrivals_ptr is not None:
        for i in range(tl.program_id(0), n_arrivals, tl.num_programs(0)):
            tl.store(arrivals_ptr + i, 0)
    _, _, used, rank = _expert_buckets(ids_ptr, T * TOP_K, E, S_PAD, NUM_BINS)
    token_ids, id_mask = _token_ids(ids_ptr, T, TOP_K, T_PAD, TOP_K_PAD)
    token_weights = _token_weights(weights_ptr, id_mask, TOP_K, T_PAD, TOP_K_PAD)
    n_splits = tl.cdiv(I, BLOCK_I)
    n_used = tl.sum(used.to(tl.int32), 0)
    if tl.program_id(0) == 0:  # the list's length, after its longest possible content
        tl.store(used_ptr + tl.minimum(E, T * TOP_K) + HAS_SHARED, n_used + HAS_SHARED)
    n_items = (n_used + HAS_SHARED) * n_splits
    programs = tl.num_programs(0)
    n_whole = _whole_items(n_items, programs, TAIL_SPLIT)
    for item in range(tl.program_id(0), n_whole, programs):
        u, i0 = item // n_splits, (item % n_splits) * BLOCK_I
        if s_ptr is None:
            _gate_up_columns(x_ptr, stride_xt, stride_xh, w_ptr, stride_we, stride_wn, stride_wk,
                             shared_ptr, act_ptr, stride_as, used_ptr, row_weight_ptr, used,
                             rank, n_used, token_ids, token_weights, u, i0, T, H, I, E, T_PAD,
                             NUM_BINS, HAS_SHARED, BLOCK_I, BLOCK_K, PRECISION, WEIGHED_ACT)
        else:
            _fp8_decode_item(x_ptr, stride_xt, stride_xh, x_inverse_ptr, stride_xi, w_ptr,
                             stride_we, stride_wn, stride_wk, shared_ptr, s_ptr, stride_se,
                             stride_sn, stride_sk, shared_s_ptr, act_ptr, stride_as,
                             act_scale_ptr, stride_ss, used_ptr, row_weight_ptr, used, rank,
                             n_used, token_ids, token_weights, u, i0, T, H, I, E, T_PAD,
                             NUM_BINS, HAS_SHARED, BLOCK_I, BLOCK_K, PRECISION, SCALE_N,
                             SCALE_K, FP8_BITS, DOT, TMA)
    if TAIL_SPLIT > 1:  # model-dtype weights only: an FP8 item has no pieces
        tl.static_assert(s_ptr is None, "TAIL_SPLIT must be 1 with FP8 weights")
        PIECE: tl.constexpr = BLOCK_I // TAIL_SPLIT
        for piece in range(tl.program_id(0), (n_items - n_whole) * TAIL_SPLIT, programs):
            item = n_whole + piece // TAIL_SPLIT
            i0 = (item % n_splits) * BLOCK_I + (piece % TAIL_SPLIT) * PIECE
            _gate_up_columns(x_ptr, stride_xt, stride_xh, w_ptr, stride_we, stride_wn, stride_wk,
                             shared_ptr, act_ptr, stride_as, used_ptr, row_weight_ptr, used,
                             rank, n_used, token_ids, token_weights, item // n_splits, i0, T, H,
                             I, E, T_PAD, NUM_BINS, HAS_SHARED, PIECE, TAIL_K, PRECISION,
                             WEIGHED_ACT)


@triton.jit
def _nan_rows(token_ids, id_mask, token_weights, E):
    """[T_PAD] bool: tokens whose every slot is empty and every weight NaN (route's all-NaN
    logits row). NaN rule (docs/routing.md): such a token outputs NaN, not 0 (each split's
    share is NaN for it, so the sum of the shares is too); a NaN weight in a filled slot makes
    NaN through the sum by itself."""
    any_filled = tl.max((id_mask & (token_ids >= 0) & (token_ids < E)).to(tl.int32), 1) > 0
    all_nan = tl.min(tl.where(id_mask, token_weights != token_weights, True).to(tl.int32), 1) > 0
    return ~any_filled & all_nan


@triton.jit
def _sum_shares(y, partial_tile, out_tile, tile_ok, arrivals, share, share_stride,
                T_PAD: tl.constexpr, BLOCK_H: tl.constexpr, EXPERT_SPLITS: tl.constexpr):
    """Write this share's partial y; the last of the column block's EXPERT_SPLITS programs to
    arrive adds every share's partial in share order into out_tile (deterministic whoever
    arrives last) and rearms the arrival counter."""
    tl.store(partial_tile + share * share_stride, y, mask=tile_ok)
    tl.debug_barrier()  # all of this program's partial is written before it counts itself
    if tl.atomic_add(arrivals, 1, sem="acq_rel") == EXPERT_SPLITS - 1:
        total = tl.zeros((T_PAD, BLOCK_H), dtype=tl.float32)
        for s in tl.static_range(EXPERT_SPLITS):
            # .cg: read the other programs' partials from L2, never a stale L1 line.
            total += tl.load(partial_tile + s * share_stride, mask=tile_ok, other=0.0,
                             cache_modifier=".cg")
        tl.store(out_tile, total.to(out_tile.dtype.element_ty), mask=tile_ok)
        tl.atomic_xchg(arrivals, 0)  # ready for the next launch, even without a gate/up


@triton.jit
def _down_shares(act_ptr, stride_as, w_ptr, stride_we, stride_wh, stride_wi, shared_ptr,
                 used_ptr, row_weight_ptr, offs_h, first, end, H, I, E,
                 T_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, WEIGHED_ACT: tl.constexpr):
    """y [T_PAD, BLOCK_H] fp32: the sum of w act_e W_down[e]^T over the flat (expert, I step)
    steps first .. end (model-dtype weights), w the tokens' routing weights: in the act rows
    already (WEIGHED_ACT, _gate_up_columns), else (fp16 act rows) each step's product is weighed
    by row_weight_ptr[u, :] before it is added. The products are transposed, [BLOCK_H, T_PAD],
    the weight tile on the MMA's M side as in _silu_gate_up_t, at any BLOCK_H; from 64 rows
    Hopper's wgmma takes them (below, mma.sync: at 32 columns this was slower than the tokens
    on M, docs/moe.md).

    With WEIGHED_ACT, one accumulator through every step, touched by nothing but the MMAs, so
    that a step's MMAs need not finish before the next step's start (weighing each expert's sum
    after its last step, as until the nineteenth session, waited for them every step; so does
    weighing fp16 rows' products). Each step loads which
    expert it is from the gate/up's list (used_ptr[u]); its act tile, rows u * T_PAD + t, needs
    nothing loaded first (until the nineteenth session the act rows were by slot, found from a
    table the gate/up wrote, and before the eighteenth from the ids)."""
    h_ok = offs_h < H
    t = tl.arange(0, T_PAD)
    k_steps = tl.cdiv(I, BLOCK_K)
    y_t = tl.zeros((BLOCK_H, T_PAD), dtype=tl.float32)
    for step in range(first, end):
        u = step // k_steps
        expert = tl.load(used_ptr + u)
        offs_k = (step % k_steps) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < I
        # The list names the shared expert E: its weights are at shared_ptr (_weights_of).
        w_tile = _weights_of(expert.to(tl.int64), E, w_ptr, stride_we, shared_ptr) \
            + offs_h[:, None] * stride_wh + offs_k[None, :] * stride_wi
        rows = (u * T_PAD + t).to(tl.int64)
        a_t = tl.load(act_ptr + rows[None, :] * stride_as + offs_k[:, None], mask=k_ok[:, None],
                      other=0.0)
        w = tl.load(w_tile, mask=h_ok[:, None] & k_ok[None, :], other=0.0)
        if WEIGHED_ACT:
            y_t = tl.dot(w, a_t, y_t, input_precision=PRECISION)
        else:
            row_weight = tl.load(row_weight_ptr + u * T_PAD + t)
            y_t += tl.dot(w, a_t, input_precision=PRECISION) * row_weight[None, :]
    return tl.trans(y_t)


@triton.jit
def _fp8_down_shares(act_ptr, stride_as, act_scale_ptr, stride_ss, w_ptr, stride_we, stride_wh,
                     stride_wi, s_ptr, stride_se, stride_sn, stride_sk, used_ptr, row_weight_ptr,
                     shared_ptr, shared_s_ptr, h0, first, end, H, I, E, T_PAD: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                     SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, ACT_CHUNK: tl.constexpr,
                     FP8_BITS: tl.constexpr, DOT: tl.constexpr):
    """_down_shares for FP8 weights over used experts first .. end, from what _fp8_decode_item
    wrote: act rows u * T_PAD + t, the expert used_ptr[u] (E: the shared expert, at shared_ptr
    and shared_s_ptr), the tokens' routing weights row_weight_ptr[u, :] (folded into the
    per-token factor that scales every k step's product). The products are transposed,
    [BLOCK_H, T_PAD], as kernels/moe_fp8.py makes them; y returned [T_PAD, BLOCK_H]."""
    offs_h = h0 + tl.arange(0, BLOCK_H)
    t = tl.arange(0, T_PAD)
    y_t = tl.zeros((BLOCK_H, T_PAD), dtype=tl.float32)
    # One loop nest, flattened by the compiler into one pipelined loop: weight tiles stay in
    # flight across experts.
    for u in tl.range(first, end, flatten=True):
        expert = tl.load(used_ptr + u).to(tl.int64)
        w_expert = _weights_of(expert, E, w_ptr, stride_we, shared_ptr)
        s_expert = _weights_of(expert, E, s_ptr, stride_se, shared_s_ptr)
        weight = tl.load(row_weight_ptr + u * T_PAD + t)[None, :]
        for k0 in range(0, I, BLOCK_K):
            y_t = fp8_down_step(act_ptr, stride_as, act_scale_ptr, stride_ss,
                                (u * T_PAD + t).to(tl.int64), t >= 0, weight, k0, I, y_t,
                                w_expert + offs_h[:, None] * stride_wh, stride_wi, h0, offs_h,
                                s_expert, stride_sn, stride_sk, H, BLOCK_K, PRECISION, SCALE_N,
                                SCALE_K, BLOCK_H, ACT_CHUNK, FP8_BITS, DOT)
    return tl.trans(y_t)


@triton.jit
def moe_down_combine_decode_kernel(act_ptr, stride_as, w_ptr, stride_we, stride_wh, stride_wi,
                                   ids_ptr, weights_ptr, out_ptr, stride_ot,
                                   partial_ptr, arrivals_ptr, shared_ptr, T, H, I, E, TOP_K,
                                   T_PAD: tl.constexpr, TOP_K_PAD: tl.constexpr,
                                   BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                                   EXPERT_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
                                   HAS_SHARED: tl.constexpr,
                                   s_ptr=None, stride_se=0, stride_sn=0, stride_sk=0,
                                   SCALE_N: tl.constexpr = 128, SCALE_K: tl.constexpr = 128,
                                   FP8_BITS: tl.constexpr = False, act_scale_ptr=None,
                                   stride_ss=0, ACT_CHUNK: tl.constexpr = 128,
                                   DOT: tl.constexpr = "model", used_ptr=None,
                                   row_weight_ptr=None, shared_s_ptr=None,
                                   WEIGHED_ACT: tl.constexpr = False, PDL: tl.constexpr = False):
    """out[:, BLOCK_H columns] = sum over used experts e of w[:, e] * act_e W_down[e]^T (with
    WEIGHED_ACT w is in act already: moe_gate_up_decode_kernel; else the products are weighed
    by row_weight_ptr).

    Program (h, s) takes BLOCK_H columns of H and the s-th of EXPERT_SPLITS contiguous shares
    of the (used expert, I step) pairs (FP8 weights: of the used experts), so each down weight
    is read once. The (expert, I step) pairs are one flat loop so the pipeliner keeps the next
    experts' weight tiles in flight across expert boundaries. With one split the program sums
    its token rows in registers and writes out: no partials, no atomics. With more (more
    programs, so more bytes in flight when few experts are used), each writes an fp32 partial
    [EXPERT_SPLITS, T, H] and the last of a column block's programs to arrive adds them in
    split order: deterministic whoever arrives last.

    act_ptr [U * T_PAD, I]; w_ptr [E, H, I]; ids_ptr int / weights_ptr fp32 [T, TOP_K];
    out_ptr [T, H]; partial_ptr fp32 [EXPERT_SPLITS, T, H] and arrivals_ptr int32 [cdiv(H,
    BLOCK_H)] (zeroed), both None with one split; shared_ptr [H, I] or None. BLOCK_K: reduction
    step along I; the pads as in moe_gate_up_decode_kernel. s_ptr, SCALE_N/K, FP8_BITS,
    act_scale_ptr, ACT_CHUNK, DOT: FP8 weights as in moe_down_kernel, shared_s_ptr the FP8
    shared expert's [cdiv(H, SCALE_N), cdiv(I, SCALE_K)]; their act rows and row_weight_ptr
    as moe_gate_up_decode_kernel wrote them. used_ptr int32 [U + 1]: the gate/up's list of used
    experts and its length (the down makes no histogram of the ids); with model-dtype weights
    the act rows come weighed by the routing weights, with FP8 weights row_weight_ptr fp32 [U,
    T_PAD] weighs the products. ids_ptr / weights_ptr are read here only for the NaN rule
    (_nan_rows).
    """
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    token_ids, id_mask = _token_ids(ids_ptr, T, TOP_K, T_PAD, TOP_K_PAD)
    t = tl.arange(0, T_PAD)
    token_weights = _token_weights(weights_ptr, id_mask, TOP_K, T_PAD, TOP_K_PAD)
    nan_row = _nan_rows(token_ids, id_mask, token_weights, E)
    h0 = tl.program_id(0) * BLOCK_H
    offs_h = h0 + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    k_steps = tl.cdiv(I, BLOCK_K)
    # The gate/up's list and its length (no histogram of the ids here).
    n_experts = tl.load(used_ptr + tl.minimum(E, T * TOP_K) + HAS_SHARED)
    share = tl.program_id(1)
    if s_ptr is None:  # shares of the (expert, I step) pairs, even to a step
        n_steps = n_experts * k_steps
        y = _down_shares(act_ptr, stride_as, w_ptr, stride_we, stride_wh, stride_wi, shared_ptr,
                         used_ptr, row_weight_ptr, offs_h,
                         share * n_steps // EXPERT_SPLITS, (share + 1) * n_steps // EXPERT_SPLITS,
                         H, I, E, T_PAD, BLOCK_H, BLOCK_K, PRECISION, WEIGHED_ACT)
    else:  # shares of the experts (used experts first .. end)
        first = share * n_experts // EXPERT_SPLITS
        end = (share + 1) * n_experts // EXPERT_SPLITS
        y = _fp8_down_shares(act_ptr, stride_as, act_scale_ptr, stride_ss, w_ptr, stride_we,
                             stride_wh, stride_wi, s_ptr, stride_se, stride_sn, stride_sk,
                             used_ptr, row_weight_ptr, shared_ptr, shared_s_ptr, h0, first,
                             end, H, I, E, T_PAD, BLOCK_H, BLOCK_K, PRECISION, SCALE_N, SCALE_K,
                             ACT_CHUNK, FP8_BITS, DOT)
    y = tl.where(nan_row[:, None], float("nan"), y)
    tile_ok = (t < T)[:, None] & h_ok[None, :]
    out_tile = out_ptr + t.to(tl.int64)[:, None] * stride_ot + offs_h[None, :]
    if EXPERT_SPLITS == 1:
        tl.store(out_tile, y.to(out_ptr.dtype.element_ty), mask=tile_ok)
    else:
        partial_tile = partial_ptr + t.to(tl.int64)[:, None] * H + offs_h[None, :]
        _sum_shares(y, partial_tile, out_tile, tile_ok, arrivals_ptr + tl.program_id(0), share,
                    T * H, T_PAD, BLOCK_H, EXPERT_SPLITS)
