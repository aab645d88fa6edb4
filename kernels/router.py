"""The router of a MoE layer in two launches: its fp32 logits GEMM, then one routing launch.

- `router_logits_kernel`: logits [T, E] = hidden [T, H] @ gate_weight[E, H]^T in fp32 (hidden of
  any float dtype is widened exactly; fp32 products and sums, no tensor-core rounding), one
  program per BLOCK_T rows x BLOCK_E experts (x SPLIT_K shares of the hidden columns). Why not
  torch's matmul: at one 32-row block the GEMM reads 2 MB of fp32 weights, and cuBLAS plus the
  hidden.float() copy took 12.8 us on the H200 (bench_routing --router); small expert tiles
  and short reduction chains spread the weights over many SMs instead. Deterministic: every
  logit is a fixed-order sum (split shares added in split order), whatever arrives first.
- `window_route_kernel`: route_kernel's rows, but each program first computes its routing
  window's coreset itself (the window's logits are 32 KB, read from L2), so a block policy
  needs one launch instead of block_coreset_kernel + route_kernel. The coreset's top-p/top-size
  cut ranks the window scores by counting, for each expert, the experts whose key beats its
  key (and their score mass) instead of a bitonic sort: the same ranks (keys are unique), and
  the chain of dependent steps is a handful of reductions instead of ~36 sort stages.
  Every program of a window writes the same coreset bytes, then reads them back in the pick
  layout (a benign race: the values are equal).
The rules are those of docs/routing.md; the reference is dmoe_triton/reference.py.
"""
import triton
import triton.language as tl

from .moe_matmul import _sum_shares
from .policy_codes import CAPACITY
from .routing import NO_KEY, _keep, _key, _route_chunk, _window_scores, _window_shift


@triton.jit
def router_logits_kernel(x_ptr, stride_xt, w_ptr, stride_we, logits_ptr, partial_ptr,
                         arrivals_ptr, T, H, chunk,
                         E: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Grid (cdiv(T, BLOCK_T), cdiv(E, BLOCK_E), SPLIT_K): logits[t, e] = sum_k x[t, k] *
    w[e, k], fp32.

    x_ptr [T, H] fp32/fp16/bf16, row stride stride_xt, unit stride along H; w_ptr fp32 [E, H],
    row stride stride_we, unit along H; logits_ptr fp32 [T, E] contiguous, out. T: rows; H:
    hidden size; BLOCK_T, BLOCK_E, BLOCK_K: tile of rows, experts and the reduction step
    (powers of two; a broadcast product and a sum, so any size works, no tl.dot minimum).
    SPLIT_K > 1: program z sums the H columns [z * chunk, (z + 1) * chunk) only (chunk a
    multiple of BLOCK_K), writes that partial to partial_ptr fp32 [SPLIT_K, T, E], and the last
    of a tile's SPLIT_K programs to arrive (arrivals_ptr int32 [row tiles * expert tiles],
    zero at launch) adds the partials in split order (moe_matmul._sum_shares, the decode down's
    split sum): deterministic whoever arrives last. Why split: the loop's steps are a chain of
    dependent loads (no tl.dot, so no software pipelining), and 2 MB of weights over a few long
    chains took ~70 us on the H200.
    """
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: t * stride
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    t_ok = t < T
    e_ok = e < E
    split = tl.program_id(2)
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for k0 in range(split * chunk, tl.minimum((split + 1) * chunk, H), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < H
        x = tl.load(x_ptr + t[:, None] * stride_xt + k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(w_ptr + e[:, None] * stride_we + k[None, :], mask=e_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tile = t[:, None] * E + e[None, :]
    tile_ok = t_ok[:, None] & e_ok[None, :]
    if SPLIT_K == 1:
        tl.store(logits_ptr + tile, acc, mask=tile_ok)
    else:
        plane = (T * E).to(tl.int64)  # int64: split * T * E passes 2**31 at long prompts
        arrivals = arrivals_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        _sum_shares(acc, partial_ptr + tile, logits_ptr + tile, tile_ok, arrivals, split, plane,
                    BLOCK_T, BLOCK_E, SPLIT_K)


@triton.jit
def _ranks(score, e, e_ok, E_PAD: tl.constexpr, CW: tl.constexpr):
    """For each expert: how many experts rank above it (larger score, ties to the lower id) and
    the score mass of those, both int32/fp32 [E_PAD]; padding (e >= E) ranks last.

    The rivals are walked in chunks of CW experts (a [E_PAD, CW] comparison at a time, not the
    whole [E_PAD, E_PAD] square in registers); a chunk is pulled out of the reshaped scores by a
    masked reduction."""
    keys = tl.where(e_ok, _key(score, e), NO_KEY)
    values = tl.where(e_ok, score, 0.0)
    key_rows = tl.reshape(keys, [E_PAD // CW, CW])  # expert c * CW + w at (c, w)
    value_rows = tl.reshape(values, [E_PAD // CW, CW])
    chunk = tl.arange(0, E_PAD // CW)[:, None]
    rank = tl.zeros([E_PAD], dtype=tl.int32)
    mass = tl.zeros([E_PAD], dtype=tl.float32)
    for c in tl.static_range(E_PAD // CW):
        rival_key = tl.max(tl.where(chunk == c, key_rows, NO_KEY), axis=0)
        rival_value = tl.sum(tl.where(chunk == c, value_rows, 0.0), axis=0)
        ahead = rival_key[None, :] > keys[:, None]
        rank += tl.sum(ahead.to(tl.int32), axis=1)
        mass += tl.sum(tl.where(ahead, rival_value[None, :], 0.0), axis=1)
    return rank, mass


@triton.jit
def _window_keep(logits_ptr, bias_ptr, row_valid_ptr, base, row_start, row_end, top_p, guard,
                 coreset_size, E: tl.constexpr, VOTE_K: tl.constexpr, POLICY: tl.constexpr,
                 VOTE_T: tl.constexpr, E_PAD: tl.constexpr, CW: tl.constexpr,
                 VOTE_COLS: tl.constexpr):
    """bool [E_PAD]: the coreset of the window of real rows [row_start, row_end) (rules of
    block_coreset_kernel, docs/routing.md): dMoE keeps every expert whose inclusive cumulative
    mass in rank order is <= top_p, the first past it and the first, else the top-guard;
    DES-vote and capacity keep the top coreset_size."""
    e = tl.arange(0, E_PAD)
    e_ok = e < E
    score, real_rows = _window_scores(logits_ptr, bias_ptr, row_valid_ptr, base, row_start,
                                      row_end, E, VOTE_K, POLICY == CAPACITY, VOTE_T, E_PAD,
                                      VOTE_COLS)
    rank, mass_above = _ranks(score, e, e_ok, E_PAD, CW)
    keep = _keep(mass_above + score, rank, e_ok, top_p, guard, coreset_size, POLICY, E_PAD)
    return keep & (real_rows > 0)  # a window of padding (or of no row here) keeps none


@triton.jit
def window_route_kernel(
    logits_ptr, bias_ptr, ids_ptr, weights_ptr, coreset_ptr, first_position_ptr, row_valid_ptr,
    L, n_blocks, block_size, chunks_per_block, top_p, guard, coreset_size, scaling,
    E: tl.constexpr, VOTE_K: tl.constexpr, POLICY: tl.constexpr, N_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, VOTE_T: tl.constexpr, E_PAD: tl.constexpr, CW: tl.constexpr,
    VOTE_COLS: tl.constexpr, G_PAD: tl.constexpr, GS_PAD: tl.constexpr, TOP_K_PAD: tl.constexpr,
):
    """A block policy in one launch; grid (S * n_blocks * chunks_per_block,): program = (window
    slot, chunk of BLOCK_T rows), as route_kernel's.

    Arguments: block_coreset_kernel's (coreset_ptr is written: uint8 [S, n_blocks, E]; VOTE_T
    is its BLOCK_T, the rows of one vote chunk; VOTE_COLS as there) and route_kernel's (ids,
    weights, scaling, the pick config N_GROUP / GROUP_SIZE / TOPK_GROUP, TOP_K, BLOCK_T rows
    routed per program).
    CW: rivals per ranking step (a power of two dividing E_PAD).
    """
    pid = tl.program_id(0).to(tl.int64)  # int64: (seq * L + row) * E passes 2**31 (issue 11)
    block_id = pid // chunks_per_block  # = seq * n_blocks + window slot
    seq = block_id // n_blocks
    block_start = (block_id % n_blocks) * block_size - _window_shift(first_position_ptr, seq,
                                                                     block_size)
    row_end = tl.minimum(block_start + block_size, L)
    keep = _window_keep(logits_ptr, bias_ptr, row_valid_ptr, seq * L, tl.maximum(block_start, 0),
                        row_end, top_p, guard, coreset_size, E, VOTE_K, POLICY, VOTE_T, E_PAD, CW,
                        VOTE_COLS)
    e = tl.arange(0, E_PAD)
    tl.store(coreset_ptr + block_id * E + e, keep.to(tl.uint8), mask=e < E)
    tl.debug_barrier()  # the coreset is read back below by other threads of this program
    chunk_start = block_start + (pid % chunks_per_block) * BLOCK_T
    _route_chunk(logits_ptr, bias_ptr, ids_ptr, weights_ptr, coreset_ptr, block_id, seq * L,
                 chunk_start, row_end, scaling, E, N_GROUP, GROUP_SIZE, TOPK_GROUP, TOP_K,
                 BLOCK_T, G_PAD, GS_PAD, TOP_K_PAD)
