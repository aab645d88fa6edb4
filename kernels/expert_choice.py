"""Expert-choice routing (docs/routing.md, Expert choice): experts take their top-c rows.

One launch per MoE layer (after the votes and coreset kernels for expert choice inside the dMoE
coreset): one program per routing window of one sequence holds the window's whole
[rows x experts] score tile, so the capacity (which depends on the window's real rows, masked
rows and eligible experts) and every expert's picks come out of one program without a second
pass. Each pick is one column-wise max over int64 keys that pack (score, row): the high 32
bits order the fp32 score, the low bits order rows so that ties go to the lower row; a taken
row is struck out of its column by its unique key, c times.

Output layout: one slot per expert. Slot e of row t holds e if expert e took row t, else -1,
so rows keep the [rows, slots] layout `moe_forward` consumes (-1 = empty slot) and no pick
can be dropped however many experts take one row.
"""
import triton
import triton.language as tl

from .pdl import wait_previous_kernel
from .routing import NEG_INF, NO_KEY, _key, _load_scores, _window_start

# Schedule codes (config.SCHEDULES order): how k follows the window's mask ratio.
FIXED = tl.constexpr(0)
LINEAR = tl.constexpr(1)
LINEAR_REVERSE = tl.constexpr(2)


@triton.jit
def _capacity(n_real, n_masked, n_eligible, k_min, k_max, SCHEDULE: tl.constexpr):
    """c = min(rows, cdiv(rows * k, eligible)) in integers (reference.expert_choice_capacity):
    rows * k = rows * k_min + (k_max - k_min) * n, n = 0, masked rows or unmasked rows."""
    if SCHEDULE == LINEAR:
        n = n_masked
    elif SCHEDULE == LINEAR_REVERSE:
        n = n_real - n_masked
    else:
        n = n_real * 0
    total = n_real * k_min + (k_max - k_min) * n
    c = tl.minimum((total + n_eligible - 1) // tl.maximum(n_eligible, 1), n_real)
    return tl.where(n_eligible > 0, c, 0)


@triton.jit
def _window_flags(row_valid_ptr, row_masked_ptr, base, rows, in_forward):
    """(real, masked) bool [BLOCK_T]: rows of this forward that are not padding, and those of
    them that hold the mask token (none without row_masked_ptr)."""
    real = in_forward
    if row_valid_ptr is not None:
        real &= tl.load(row_valid_ptr + base + rows, mask=in_forward, other=0) != 0
    masked = real & (rows < 0)  # none
    if row_masked_ptr is not None:
        masked = real & (tl.load(row_masked_ptr + base + rows, mask=in_forward, other=0) != 0)
    return real, masked


@triton.jit
def expert_choice_kernel(
    logits_ptr, bias_ptr, coreset_ptr, first_position_ptr, row_valid_ptr, row_masked_ptr,
    ids_ptr, weights_ptr, L, n_blocks, block_size, k_min, k_max, scaling,
    E: tl.constexpr, SCHEDULE: tl.constexpr, HAS_CORESET: tl.constexpr,
    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One routing window's expert choice; grid (S * n_blocks,), program = seq * n_blocks + slot.

    logits_ptr: fp32 [S, L, E] router logits, contiguous. bias_ptr: fp32 [E] expert bias.
    coreset_ptr: uint8 [S, n_blocks, E]: with HAS_CORESET the eligible experts (the dMoE
    coreset from block_coreset_kernel), read; else written: every expert for a window with a
    real row, none otherwise.
    first_position_ptr: int [S] or None, row_valid_ptr: uint8 [S, L] or None: the windows, as
    in block_coreset_kernel. row_masked_ptr: uint8 [S, L] (1 = the row holds the mask token) or
    None (none masked): the mask ratio the schedule reads.
    ids_ptr: int32 [S, L, E] out, slot e = e if expert e took the row, else -1.
    weights_ptr: fp32 [S, L, E] out: sigmoid(logit) of the taken slots, normalised over the
    row's taken slots, times scaling; 0 in empty slots; NaN in every slot of a row whose
    scores hold a NaN.
    L: rows per sequence; n_blocks: window slots per sequence; block_size: rows per window.
    k_min, k_max: the schedule's k at the two ends (equal for FIXED). scaling: routed scale.
    E: experts; SCHEDULE: FIXED, LINEAR or LINEAR_REVERSE; BLOCK_T: next power of two >=
    block_size (the window's rows in one tile); E_PAD: next power of two >= E.
    """
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    pid = tl.program_id(0).to(tl.int64)  # int64: (seq * L + row) * E passes 2**31 (issue 11)
    seq = pid // n_blocks
    base = seq * L
    t = tl.arange(0, BLOCK_T)
    rows = _window_start(first_position_ptr, pid, n_blocks, block_size) + t
    in_forward = (t < block_size) & (rows >= 0) & (rows < L)
    real, masked = _window_flags(row_valid_ptr, row_masked_ptr, base, rows, in_forward)
    n_real = tl.sum(real.to(tl.int32), axis=0)
    e = tl.arange(0, E_PAD)
    e_ok = e < E
    if HAS_CORESET:
        eligible = tl.load(coreset_ptr + pid * E + e, mask=e_ok, other=0) != 0
    else:
        eligible = e_ok & (n_real > 0)  # a window of padding (or of no row here) keeps none
        tl.store(coreset_ptr + pid * E + e, eligible.to(tl.uint8), mask=e_ok)
    c = _capacity(n_real, tl.sum(masked.to(tl.int32), axis=0),
                  tl.sum(eligible.to(tl.int32), axis=0), k_min, k_max, SCHEDULE)

    r, _, is_nan = _load_scores(logits_ptr, bias_ptr, base + rows[:, None], in_forward[:, None],
                                e[None, :], e_ok[None, :], E)
    keys = tl.where(real[:, None] & eligible[None, :], _key(r, t[:, None]), NO_KEY)
    work = keys
    for _ in range(c):  # each expert strikes out its best remaining row
        work = tl.where(work == tl.max(work, axis=0)[None, :], NO_KEY, work)
    took = (work != keys) & (r > NEG_INF)  # a -inf score (a NaN) is never taken

    # The weight is the unbiased sigmoid of each taken slot: one gather from the logits rows.
    at = (base + rows)[:, None] * E + e[None, :]
    w = tl.where(took, tl.sigmoid(tl.load(logits_ptr + at, mask=took, other=0.0)), 0.0)
    w = w / (tl.sum(w, axis=1)[:, None] + 1e-20) * scaling
    bad = tl.max(is_nan.to(tl.int32), axis=1) > 0
    w = tl.where(bad[:, None], float("nan"), w)
    out_ok = in_forward[:, None] & e_ok[None, :]
    tl.store(ids_ptr + at, tl.where(took, e[None, :], -1), mask=out_ok)
    tl.store(weights_ptr + at, w, mask=out_ok)
