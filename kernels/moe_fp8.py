"""FP8 (e4m3) expert weights in the expert matmuls of moe_matmul.py (issue 16): the k-loop pieces.

Weights are fine-grained FP8 checkpoints' (dmoe_triton/quant.py): e4m3 W with one fp32 scale per
SCALE_N x SCALE_K block, W = W_fp8 * scale. Every FP8 tile product here is transposed against the
model-dtype path: acc^T [BLOCK_N, ROWS] = W [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, ROWS], weights as
the left operand, so that the weight tile fills the MMA's 64-row side that a 32-token block
cannot (and, converted, may come from registers: Hopper's wgmma takes only its left operand
so).

Each dot lies in one scale block along K (the gate/up's k step is a divisor of SCALE_K; the
down's may be wider, and is then one dot per act chunk, which divides SCALE_K: fp8_down_step,
launch.fit_scale_blocks), so its product is scaled once, after the dot, in fp32: exact
products, no rounding of W * scale. When the tile's BLOCK_N rows lie in one scale block too
(SCALE_N a multiple of BLOCK_N: tiles start at multiples of BLOCK_N), that is one scalar per
dot; otherwise a vector over the rows.

The dot's operand type, DOT (launch.DecodeConfig.dot; bf16 activations only):
- "fp8" (W8A8): the activations are quantized to e4m3, each row's (token's) group of SCALE_K
  columns (x; act: the gate/up's BLOCK_I, which the launch makes a divisor of SCALE_K, at
  least 32: launch.fit_scale_blocks) multiplied by the power of two that puts its largest
  |value| in [2**7, 2**8) and rounded to nearest, ties to even (_round_to_e4m3); the product
  is multiplied back by the inverse power of two in fp32.
  Both operands go to the FP8 tensor cores as they are: no conversion in the k loop.
- "fp16": e4m3 -> bf16 costs a conversion per value on sm_89/sm_90 (e4m3x2 -> f16x2 is one
  instruction, then f16 -> bf16 one per value, in the slower conversion unit), while e4m3 ->
  fp16 is exact and is the one instruction per two values. So the dot runs in fp16, and the
  activations are brought into fp16 range exactly: the power of two puts a group's largest
  |value| in [2**14, 2**15). A bf16 value is then an fp16 value (8 significant bits in fp16's
  11) unless it is more than 2**28 below its group's largest, where it rounds to fp16's
  subnormal step (an absolute error under 2**-39 of the group's largest value per element).
- "model": the weights are converted to the activations' dtype (exact for bf16, fp16, fp32).
The gate/up's activations may arrive prepared, for the whole call, by scaled_rows_kernel (one
more launch; always with "fp8" where a k step is narrower than a scale block), and its k loop
then reads each tile as it is; else each k step's tile is scaled in the loop (with "fp8" the
step is then one scale block's columns, its group: the same e4m3 values as the launch's).

The act rows between gate/up and down are written the same way: in the dot's type, scaled per
(row, gate/up work item's ACT_CHUNK columns) by a power of two whose inverse goes to an fp32
[rows, cdiv(I, ACT_CHUNK)] buffer (a down k step wider than ACT_CHUNK is that many dots, each with
its chunk's scales).
"""
import triton
import triton.language as tl

from .pdl import wait_previous_kernel

# The power of two puts |x|'s largest exponent e (biased, fp32) at 2**14 for fp16 (scale =
# 2**(141 - e), as an fp32 bit pattern (141 - e + 127) << 23) and at 2**7 for e4m3 (its largest
# finite value is 448 = 1.75 * 2**8); capped at 2**126 (an inverse must stay normal).
_FP16_FIELD = tl.constexpr(268)
_E4M3_FIELD = tl.constexpr(261)
_MAX_FIELD = tl.constexpr(253)


@triton.jit
def _fp8_values(w, dtype, FP8_BITS: tl.constexpr):
    """An FP8 weight tile as `dtype`, exactly. FP8_BITS: the tile holds e4m3 bytes (uint8);
    moving sign and exponent|mantissa into fp16's bit positions gives value / 256 for every
    finite e4m3 byte, subnormals included (the scales carry the 256: _tile_scale)."""
    if FP8_BITS:
        b = w.to(tl.int16)
        w = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.float16, bitcast=True)
    return w.to(dtype)


@triton.jit
def _round_to_e4m3(v):
    """fp32 v (|v| <= 256) rounded to the nearest e4m3 value, ties to even, still fp32: from
    2**-6 up (normal e4m3) by dropping 20 of fp32's 23 mantissa bits with a rounding carry;
    below, to the subnormal step 2**-9 (an add and subtract of 1.5 * 2**14, whose fp32 ulp is
    2**-9; the sign put back). Done here, not by the e4m3 conversion, whose rounding the
    interpreter (triton 3.9) gets wrong where the mantissa carries into the exponent (7.81 ->
    4, not 8); the conversion of the rounded value is exact on every backend. NaN stays NaN."""
    bits = v.to(tl.int32, bitcast=True)
    normal = (bits + ((bits >> 20) & 1) + 0x7FFFF) & -1048576  # -1048576: ~0xFFFFF
    magnitude = ((tl.abs(v) + 24576.0) - 24576.0).to(tl.int32, bitcast=True)
    subnormal = magnitude | (bits & -2147483648)  # the sign back (-0 stays -0)
    big = ((bits >> 23) & 0xFF) >= 121  # |v| >= 2**-6, or NaN
    return tl.where(big, normal, subnormal).to(tl.float32, bitcast=True)


@triton.jit
def _pow2_scaled(x, AXIS: tl.constexpr, DOT: tl.constexpr):
    """x (bf16 or fp32) -> (x * 2**p in DOT's type, 2**-p fp32) with one power of two per slice
    along AXIS (keep_dims: the inverse broadcasts back), chosen from the slice's largest |x|
    (module docstring). DOT "fp16": NaN stays NaN, +-inf stays +-inf, zeros stay zeros. DOT
    "fp8" (e4m3, which has no inf): a slice holding inf or NaN gets a NaN inverse, so its
    products are NaN, never a finite value."""
    xf = x.to(tl.float32)
    # NaN counts as inf here: a GPU's max skips NaN, and the fp8 dot must see it (below).
    amax = tl.max(tl.where(xf == xf, tl.abs(xf), float("inf")), AXIS, keep_dims=True)
    top = _FP16_FIELD if DOT == "fp16" else _E4M3_FIELD
    field = tl.minimum(top - ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF), _MAX_FIELD)
    scale = (field << 23).to(tl.float32, bitcast=True)
    inverse = ((254 - field) << 23).to(tl.float32, bitcast=True)
    if DOT == "fp16":
        scaled = (xf * scale).to(tl.float16)
    else:
        scaled = _round_to_e4m3(xf * scale).to(tl.float8e4nv)
        inverse = tl.where(amax < float("inf"), inverse, float("nan"))
    return scaled, inverse


@triton.jit
def scaled_rows_kernel(x_ptr, stride_xt, stride_xh, xs_ptr, inverse_ptr, H,
                       CHUNK: tl.constexpr, CHUNK_PAD: tl.constexpr, DOT: tl.constexpr,
                       PDL: tl.constexpr = False):
    """Activations prepared once for the fp16 or fp8 dot (DOT): x [T, H] (bf16, strides in
    elements) -> xs_ptr [T, H] contiguous in DOT's type and inverse_ptr fp32 [T, cdiv(H,
    CHUNK)], each row's CHUNK columns (the scale blocks' SCALE_K) scaled by one power of two
    (_pow2_scaled), so a gate/up k step within a chunk reads its tile as it is, with no
    conversion in the loop. CHUNK_PAD: next power of two >= CHUNK. Grid (T, cdiv(H, CHUNK))."""
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    t = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, CHUNK_PAD)
    offs = chunk * CHUNK + cols
    ok = (cols < CHUNK) & (offs < H)
    x = tl.load(x_ptr + t * stride_xt + offs[None, :] * stride_xh, mask=ok[None, :], other=0.0)
    xs, inverse = _pow2_scaled(x, 1, DOT)
    tl.store(xs_ptr + t * H + offs[None, :], xs, mask=ok[None, :])
    tl.store(inverse_ptr + t * tl.cdiv(H, CHUNK) + chunk + tl.zeros((1, 1), tl.int32), inverse)


@triton.jit
def _x_operand(x_t, x_inverse_cols, rows_ok, k0, SCALE_K: tl.constexpr, DOT: tl.constexpr):
    """A loaded activation tile x^T [BLOCK_K, ROWS] as the dot's right operand and the factor
    [1, ROWS] that undoes its scaling: x_inverse_cols [1, ROWS] given, the tile is
    scaled_rows_kernel's (chunk = SCALE_K, which holds the k step) and its factors are loaded;
    else with a scaled DOT it is scaled here; else taken as it is (factor 1)."""
    if x_inverse_cols is not None:
        x_op = x_t
        inverse = tl.load(x_inverse_cols + k0 // SCALE_K, mask=rows_ok[None, :], other=0.0)
    elif DOT != "model":
        x_op, inverse = _pow2_scaled(x_t, 0, DOT)
    else:
        x_op = x_t
        inverse = 1.0
    return x_op, inverse


@triton.jit
def _scale_rows(base, n0, offs_n, first_row, stride_sn, SCALE_N: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Pointers to the scale row(s) of an expert's weight rows offs_n (= n0 + arange(BLOCK_N)),
    base pointing at the expert's scales, their rows starting at first_row (up rows: after the
    gate rows' cdiv(I, SCALE_N)): a scalar when the tile lies in one scale block, else
    [BLOCK_N, 1]."""
    if SCALE_N % BLOCK_N == 0:
        rows = base + (first_row + n0 // SCALE_N) * stride_sn
    else:
        rows = base + (first_row + offs_n // SCALE_N)[:, None] * stride_sn
    return rows


@triton.jit
def _tile_scale(s_rows, n_ok, k0, stride_sk, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
                BLOCK_N: tl.constexpr, FP8_BITS: tl.constexpr):
    """The fp32 scale(s) of the k step starting at k0 (scalar or [BLOCK_N, 1], as s_rows)."""
    if SCALE_N % BLOCK_N == 0:
        s = tl.load(s_rows + (k0 // SCALE_K) * stride_sk)
    else:
        s = tl.load(s_rows + (k0 // SCALE_K) * stride_sk, mask=n_ok, other=0.0)
    if FP8_BITS:
        s = s * 256.0
    return s


@triton.jit
def _fp8_dot(w_tile, acc_t, x_op, x_inverse, s_rows, n_ok, k0, stride_sk,
             PRECISION: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
             BLOCK_N: tl.constexpr, FP8_BITS: tl.constexpr):
    """acc^T + (W @ x^T) * scale * x_inverse for one k step: w_tile [BLOCK_N, BLOCK_K] the
    loaded e4m3 weights (0 outside the weight), x_op [BLOCK_K, ROWS] from _x_operand."""
    w = _fp8_values(w_tile, x_op.dtype, FP8_BITS)
    s = _tile_scale(s_rows, n_ok, k0, stride_sk, SCALE_N, SCALE_K, BLOCK_N, FP8_BITS)
    return acc_t + tl.dot(w, x_op, input_precision=PRECISION) * (s * x_inverse)


@triton.jit
def fp8_silu_gate_up(x_cols, x_inverse_cols, rows_ok, stride_xh, w, stride_wn, stride_wk, i0,
                     offs_i, H, s_expert, I, stride_sn, stride_sk,
                     ROWS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
                     PRECISION: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
                     FP8_BITS: tl.constexpr, DOT: tl.constexpr, TMA: tl.constexpr = False):
    """act^T [BLOCK_I, ROWS] fp32 = silu(W_gate x^T) * (W_up x^T) for the columns offs_i (= i0 +
    arange(BLOCK_I)) of one expert, 0 in the columns past I.

    x_cols [1, ROWS] points at each token row's first element (rows outside rows_ok masked: no
    memory traffic); x_inverse_cols [1, ROWS] at its scaled_rows_kernel factors, or None; w: the
    expert's e4m3 weights [2I, H] (gate rows, then up; strides stride_wn, stride_wk), a pointer
    to their first element, or with TMA a tensor descriptor of them in [BLOCK_I, BLOCK_K] tiles
    (whose reads past the descriptor's shape give 0; a gate tile past I reads up rows, into
    columns this zeroes); s_expert: the expert's scales [2 * cdiv(I, SCALE_N), cdiv(H,
    SCALE_K)] (gate blocks, then up).
    """
    i_ok = offs_i < I
    if not TMA:
        w_gate = w + offs_i[:, None] * stride_wn
        w_up = w_gate + I * stride_wn
    s_gate = _scale_rows(s_expert, i0, offs_i, 0, stride_sn, SCALE_N, BLOCK_I)
    s_up = _scale_rows(s_expert, i0, offs_i, tl.cdiv(I, SCALE_N), stride_sn, SCALE_N, BLOCK_I)
    acc_gate = tl.zeros((BLOCK_I, ROWS), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_I, ROWS), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        x_t = tl.load(x_cols + offs_k[:, None] * stride_xh,
                      mask=k_ok[:, None] & rows_ok[None, :], other=0.0)
        x_op, x_inverse = _x_operand(x_t, x_inverse_cols, rows_ok, k0, SCALE_K, DOT)
        if TMA:  # one copy instruction a tile (DecodeConfig.tma)
            w_gate_tile = w.load([i0, k0])
            w_up_tile = w.load([I + i0, k0])
        else:
            w_mask = i_ok[:, None] & k_ok[None, :]
            w_gate_tile = tl.load(w_gate + offs_k[None, :] * stride_wk, mask=w_mask, other=0.0)
            w_up_tile = tl.load(w_up + offs_k[None, :] * stride_wk, mask=w_mask, other=0.0)
        acc_gate = _fp8_dot(w_gate_tile, acc_gate, x_op, x_inverse, s_gate, i_ok[:, None], k0,
                            stride_sk, PRECISION, SCALE_N, SCALE_K, BLOCK_I, FP8_BITS)
        acc_up = _fp8_dot(w_up_tile, acc_up, x_op, x_inverse, s_up, i_ok[:, None], k0,
                          stride_sk, PRECISION, SCALE_N, SCALE_K, BLOCK_I, FP8_BITS)
    # Columns past I: zeros, whatever the tiles read there (TMA: up rows), so that they never
    # reach fp8_store_act's largest |value| of the act group.
    return tl.where(i_ok[:, None], acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up, 0.0)


@triton.jit
def fp8_store_act(act_t, act_ptr, stride_as, act_scale_ptr, stride_ss, slot, rows_ok, i0, offs_i,
                  I, ACT_CHUNK: tl.constexpr, DOT: tl.constexpr):
    """Write act^T [BLOCK_I, ROWS] into act rows `slot` [ROWS], columns offs_i (= i0 + arange):
    with a scaled DOT in its type scaled per row by a power of two, its inverse into
    act_scale_ptr [rows, cdiv(I, ACT_CHUNK)] at column i0 // ACT_CHUNK (module docstring); else
    in act's dtype."""
    mask = (offs_i < I)[:, None] & rows_ok[None, :]
    rows = act_ptr + slot[None, :] * stride_as + offs_i[:, None]
    if DOT != "model":
        act_scaled, inverse = _pow2_scaled(act_t, 0, DOT)
        tl.store(act_scale_ptr + slot[None, :] * stride_ss + i0 // ACT_CHUNK, inverse,
                 mask=rows_ok[None, :])
        tl.store(rows, act_scaled, mask=mask)
    else:
        tl.store(rows, act_t.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fp8_act_operand(act_ptr, stride_as, act_scale_ptr, stride_ss, slot, rows_ok, offs_k, k_ok, k0,
                    ACT_CHUNK: tl.constexpr, DOT: tl.constexpr):
    """act^T [PART, ROWS] (offs_k: k0 + arange(PART), within one ACT_CHUNK) of rows `slot` as
    the down dot's right operand, and the factor [1, ROWS] that undoes its scaling
    (fp8_store_act's inverse; 1 with the model-dtype DOT)."""
    a_t = tl.load(act_ptr + slot[None, :] * stride_as + offs_k[:, None],
                  mask=k_ok[:, None] & rows_ok[None, :], other=0.0)
    if DOT != "model":
        inverse = tl.load(act_scale_ptr + slot[None, :] * stride_ss + k0 // ACT_CHUNK,
                          mask=rows_ok[None, :], other=0.0)
    else:
        inverse = 1.0
    return a_t, inverse


@triton.jit
def fp8_down_step(act_ptr, stride_as, act_scale_ptr, stride_ss, slot, rows_ok, row_factor, k0, I,
                  acc_t, w_rows, stride_wi, h0, offs_h, s_expert, stride_sn, stride_sk, H,
                  BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, SCALE_N: tl.constexpr,
                  SCALE_K: tl.constexpr, BLOCK_H: tl.constexpr,
                  ACT_CHUNK: tl.constexpr, FP8_BITS: tl.constexpr, DOT: tl.constexpr):
    """acc^T [BLOCK_H, ROWS] + (W_down[offs_h, k0 : k0 + BLOCK_K] @ act^T) * row_factor for one
    k step of one expert: w_rows [BLOCK_H, 1] point at its e4m3 weight rows offs_h (= h0 +
    arange) and s_expert at its scales [cdiv(H, SCALE_N), cdiv(I, SCALE_K)]; row_factor [1,
    ROWS] fp32 multiplies each row's product (1.0: none).

    A step wider than the act rows' scale chunks (ACT_CHUNK: the gate/up's BLOCK_I; powers of
    two) is its chunks' dots, each with its own factors (act and weight scales): one loop
    iteration, so the pipeline's per-iteration work is paid once for the whole step, which may
    span several scale blocks. Each dot, PART = min(BLOCK_K, ACT_CHUNK) wide, lies in one scale
    block: launch.fit_scale_blocks makes BLOCK_K a divisor of SCALE_K, or, keeping a wider step
    (the fp8 dot's), ACT_CHUNK one.
    """
    PART: tl.constexpr = BLOCK_K if BLOCK_K < ACT_CHUNK else ACT_CHUNK
    h_ok = offs_h < H
    s_rows = _scale_rows(s_expert, h0, offs_h, 0, stride_sn, SCALE_N, BLOCK_H)
    for part in tl.static_range(BLOCK_K // PART):
        k = k0 + part * PART  # one act chunk, inside one scale block along K (PART divides it)
        offs_k = k + tl.arange(0, PART)
        k_ok = offs_k < I
        # A part wholly past I (a step wider than what is left of I) reads its scales at the
        # last column's: its weights and act are masked to 0, and the scales stay in bounds
        # (act scales past their row would be the next row's, or unwritten memory: NaN * 0).
        k_scales = tl.minimum(k, I - 1)
        a_op, a_inverse = fp8_act_operand(act_ptr, stride_as, act_scale_ptr, stride_ss, slot,
                                          rows_ok, offs_k, k_ok, k_scales, ACT_CHUNK, DOT)
        w_tile = tl.load(w_rows + offs_k[None, :] * stride_wi,
                         mask=h_ok[:, None] & k_ok[None, :], other=0.0)
        acc_t = _fp8_dot(w_tile, acc_t, a_op, a_inverse * row_factor, s_rows, h_ok[:, None],
                         k_scales, stride_sk, PRECISION, SCALE_N, SCALE_K, BLOCK_H, FP8_BITS)
    return acc_t
