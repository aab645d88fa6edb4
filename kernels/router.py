"""One launch for a block policy's routing (the router's logits GEMM is cuBLAS's: router.py).

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

from .policy_codes import CAPACITY
from .routing import NO_KEY, _keep, _key, _route_chunk, _window_scores, _window_shift


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
