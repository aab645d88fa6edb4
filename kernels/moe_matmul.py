"""Grouped expert matmul over a routing: only the experts that received tokens are read.

Four launches, all with grid sizes fixed by shapes (CUDA-graph capturable, no host sync):

1. `moe_align_kernel` (one program): sorts the T*k slots by expert and lists the used experts
   (`used_expert`, `used_start`, `used_count`, `n_used`). Ids outside [0, E) go to a sentinel
   bucket past the last expert and are never read as an expert.
2. `moe_gate_up_kernel`: work item = (used expert, slice of BLOCK_I intermediate columns);
   act[slot] = silu(x W_gate^T) * (x W_up^T) for the expert's slots.
3. `moe_down_kernel`: work item = (used expert, slice of BLOCK_H hidden columns);
   partial[slot] = act[slot] W_down^T in fp32.
4. `moe_combine_kernel`: y[t] = sum_j w[t, j] * partial[t*k + j] over the filled slots, in a fixed
   order (deterministic), cast to the output dtype.

Kernels 2 and 3 are persistent: a fixed number of programs loops over the work items of the used
experts only, so each used expert's weights are read once per launch (an expert's tokens are
all in its tile loop) and an unused expert costs nothing, not even an empty program. Splitting
each expert over I (or H) gives enough work items for few experts to keep every SM pulling
bandwidth.
"""
import triton
import triton.language as tl


@triton.jit
def moe_align_kernel(ids_ptr, sorted_slots_ptr, used_expert_ptr, used_start_ptr, used_count_ptr,
                     n_used_ptr, S, E, S_PAD: tl.constexpr, NUM_BINS: tl.constexpr):
    slots = tl.arange(0, S_PAD)
    ids = tl.load(ids_ptr + slots, mask=slots < S, other=-1).to(tl.int32)
    # Bucket E is the sentinel for empty slots (-1), out-of-range ids and padding.
    bucket = tl.where((ids >= 0) & (ids < E), ids, E)
    keys = tl.sort(bucket * S_PAD + slots)  # by expert, then by slot: deterministic order
    tl.store(sorted_slots_ptr + slots, keys % S_PAD)

    counts = tl.histogram(bucket, NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    starts = tl.cumsum(counts, 0) - counts
    used = (bins < E) & (counts > 0)
    rank = tl.cumsum(used.to(tl.int32), 0) - 1
    tl.store(used_expert_ptr + rank, bins, mask=used)
    tl.store(used_start_ptr + rank, starts, mask=used)
    tl.store(used_count_ptr + rank, counts, mask=used)
    tl.store(n_used_ptr, tl.sum(used.to(tl.int32), 0))


@triton.jit
def _work_item(item, n_splits, used_expert_ptr, used_start_ptr, used_count_ptr):
    """Work item -> (expert, its first sorted slot, its slot count, which split)."""
    u = item // n_splits
    expert = tl.load(used_expert_ptr + u).to(tl.int64)
    return expert, tl.load(used_start_ptr + u), tl.load(used_count_ptr + u), item % n_splits


@triton.jit
def _tile_slots(sorted_slots_ptr, start, count, m0, BLOCK_M: tl.constexpr):
    """The expert's slots m0 .. m0 + BLOCK_M (masked past its count)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < count
    return tl.load(sorted_slots_ptr + start + offs_m, mask=m_ok, other=0).to(tl.int64), m_ok


@triton.jit
def moe_gate_up_kernel(x_ptr, stride_xt, stride_xh,
                       w_ptr, stride_we, stride_wn, stride_wk,
                       act_ptr, stride_as,
                       sorted_slots_ptr, used_expert_ptr, used_start_ptr, used_count_ptr,
                       n_used_ptr, H, I, TOPK,
                       BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr):
    n_splits = tl.cdiv(I, BLOCK_I)
    n_items = tl.load(n_used_ptr) * n_splits
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        expert, start, count, split = _work_item(item, n_splits, used_expert_ptr, used_start_ptr,
                                                 used_count_ptr)
        offs_i = split * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = offs_i < I
        w_gate = w_ptr + expert * stride_we + offs_i[None, :] * stride_wn
        w_up = w_gate + I * stride_wn
        # An expert's tokens beyond the first tile re-read its weight slice from L2, not HBM.
        for m0 in range(0, count, BLOCK_M):
            slot, m_ok = _tile_slots(sorted_slots_ptr, start, count, m0, BLOCK_M)
            x_rows = x_ptr + (slot // TOPK)[:, None] * stride_xt
            acc_gate = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < H
                x = tl.load(x_rows + offs_k[None, :] * stride_xh,
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w_mask = k_ok[:, None] & i_ok[None, :]
                wg = tl.load(w_gate + offs_k[:, None] * stride_wk, mask=w_mask, other=0.0)
                wu = tl.load(w_up + offs_k[:, None] * stride_wk, mask=w_mask, other=0.0)
                acc_gate = tl.dot(x, wg, acc_gate, input_precision=PRECISION)
                acc_up = tl.dot(x, wu, acc_up, input_precision=PRECISION)
            act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
            tl.store(act_ptr + slot[:, None] * stride_as + offs_i[None, :],
                     act.to(act_ptr.dtype.element_ty), mask=m_ok[:, None] & i_ok[None, :])


@triton.jit
def moe_down_kernel(act_ptr, stride_as,
                    w_ptr, stride_we, stride_wh, stride_wi,
                    partial_ptr, stride_ps,
                    sorted_slots_ptr, used_expert_ptr, used_start_ptr, used_count_ptr,
                    n_used_ptr, H, I,
                    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr):
    n_splits = tl.cdiv(H, BLOCK_H)
    n_items = tl.load(n_used_ptr) * n_splits
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        expert, start, count, split = _work_item(item, n_splits, used_expert_ptr, used_start_ptr,
                                                 used_count_ptr)
        offs_h = split * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        w_rows = w_ptr + expert * stride_we + offs_h[None, :] * stride_wh
        for m0 in range(0, count, BLOCK_M):
            slot, m_ok = _tile_slots(sorted_slots_ptr, start, count, m0, BLOCK_M)
            acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
            for k0 in range(0, I, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < I
                a = tl.load(act_ptr + slot[:, None] * stride_as + offs_k[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_rows + offs_k[:, None] * stride_wi,
                            mask=k_ok[:, None] & h_ok[None, :], other=0.0)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
            tl.store(partial_ptr + slot[:, None] * stride_ps + offs_h[None, :], acc,
                     mask=m_ok[:, None] & h_ok[None, :])


@triton.jit
def moe_combine_kernel(partial_ptr, stride_ps, ids_ptr, weights_ptr, out_ptr, stride_ot,
                       T, H, E, TOPK, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = offs_t < T
    h_ok = offs_h < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in range(TOPK):
        slot = offs_t.to(tl.int64) * TOPK + j
        expert = tl.load(ids_ptr + slot, mask=t_ok, other=-1)
        weight = tl.load(weights_ptr + slot, mask=t_ok, other=0.0)
        filled = t_ok & (expert >= 0) & (expert < E)
        part = tl.load(partial_ptr + slot[:, None] * stride_ps + offs_h[None, :],
                       mask=filled[:, None] & h_ok[None, :], other=0.0)
        # `where`, not a product with a mask: an empty slot's weight must not leak a NaN.
        acc += tl.where(filled[:, None], part * weight[:, None], 0.0)
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + offs_h[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & h_ok[None, :])
