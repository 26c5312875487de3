"""Per-token log-probs straight from hidden states and the LM-head weight, never writing `[N, V]` logits.

Forward: each program owns a block of (non-ignored) rows and one slice of the vocab, builds logit tiles on
chip (`hidden @ weight.T` over hidden blocks, fp32 accumulate) and keeps an online max / sum-exp per row; the
host merges the per-slice log-sum-exps. Backward recomputes the same tiles from the saved log-sum-exp, forms
`g * (onehot(label) - softmax)` per tile and adds its products with `weight` and `hidden` into fp32 gradient
buffers with atomics. The plain reference is `mdpo_fast.ops.naive.linear_token_logprobs_naive`; the autograd
Function over these launchers is `mdpo_fast.ops.logprobs.LinearLogprobs`, shared with the PyTorch backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mdpo_fast.ops.kernels.config import (
    LinearLogprobsConfig,
    dot_precision,
    emulate_bf16,
    linear_bwd_config,
    linear_fwd_config,
    min_programs,
    vocab_splits,
)
from mdpo_fast.ops.rows import RowLogprobs, valid_rows


def _emulate_bf16(args) -> bool:
    return emulate_bf16(args["hidden_ptr"])


@triton.jit
def round_to_bf16(x):
    """fp32 -> nearest bf16 value (ties to even), kept in fp32. Only for the interpreter, whose cast truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _logit_tile(
    hidden_ptr,  # [N, H]
    weight_ptr,  # [V, H]
    bias_ptr,  # [V] or None
    rows,  # [BLOCK_N] int64 row indices into hidden
    row_mask,  # [BLOCK_N]
    offs_v,  # [BLOCK_V]
    col_mask,  # [BLOCK_V]
    H,
    stride_hn,
    stride_wv,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    softcap,  # float, or None
    SOFTCAP: tl.constexpr,
):
    """`hidden[rows] @ weight[offs_v].T (+ bias)` as a `[BLOCK_N, BLOCK_V]` fp32 tile, soft-capped to
    `softcap * tanh(logits / softcap)` with SOFTCAP (Gemma 2's final logits)."""
    x_row = hidden_ptr + rows[:, None] * stride_hn
    w_row = weight_ptr + offs_v.to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        x = tl.load(x_row + offs_h[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)  # [BN, BH]
        w = tl.load(w_row + offs_h[None, :], mask=col_mask[:, None] & h_mask[None, :], other=0.0)  # [BV, BH]
        if EMULATE_BF16:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:  # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates to +-1 without overflow trouble
        acc = softcap * (1.0 - 2.0 / (tl.exp(2.0 * acc / softcap) + 1.0))
    return acc


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None, "EMULATE_BF16": _emulate_bf16,
                    "SOFTCAP": lambda args: args["softcap"] is not None})
@triton.jit(do_not_specialize=["n_rows", "blocks_per_split"])
def _linear_logprobs_fwd_kernel(
    hidden_ptr,  # [N, H] float, unit stride along H
    weight_ptr,  # [V, H] hidden's dtype, unit stride along H
    bias_ptr,  # [V] hidden's dtype, or None
    labels_ptr,  # [N] int
    rows_ptr,  # [M] int64: rows whose label is not ignored
    lse_part_ptr,  # [S, M] fp32: log-sum-exp of each row over one vocab slice
    label_part_ptr,  # [S, M] fp32: the label's logit if it lies in the slice, else 0
    softcap,  # float, or None
    n_rows,  # M; changes every batch, so never a constexpr
    blocks_per_split,  # vocab blocks per slice
    H,
    V,
    stride_hn,
    stride_wv,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_m < n_rows
    rows = tl.load(rows_ptr + offs_m, mask=row_mask, other=0)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=0)

    v_start = split * blocks_per_split * BLOCK_V
    v_stop = tl.minimum(v_start + blocks_per_split * BLOCK_V, V)
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    label_logit = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_mask = offs_v < V
        logits = _logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, offs_v, col_mask, H, stride_hn, stride_wv,
            BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, EMULATE_BF16, DOT_PRECISION, softcap, SOFTCAP,
        )
        logits = tl.where(col_mask[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
        label_logit += tl.sum(tl.where(offs_v[None, :] == labels[:, None], logits, 0.0), axis=1)

    out = split * n_rows + offs_m
    tl.store(lse_part_ptr + out, m_i + tl.log(s_i), mask=row_mask)
    tl.store(label_part_ptr + out, label_logit, mask=row_mask)


@triton.jit
def _grad_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, labels, lse, g, offs_v, col_mask, H, stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr,
    EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr, softcap, SOFTCAP: tl.constexpr,
):
    """`[BLOCK_N, BLOCK_V]` fp32 d(sum g * logp) / d logits of a tile, 0 outside the rows and the vocabulary."""
    logits = _logit_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, offs_v, col_mask, H, stride_hn, stride_wv,
        BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, EMULATE_BF16, DOT_PRECISION, softcap, SOFTCAP,
    )
    # d logp / d logits = onehot(label) - softmax; padding lanes forced to 0 (exp may overflow there)
    onehot = tl.where(offs_v[None, :] == labels[:, None], 1.0, 0.0)
    grad = g[:, None] * (onehot - tl.exp(logits - lse[:, None]))
    if SOFTCAP:  # through the cap: d(c tanh(x / c)) / dx = 1 - tanh^2
        grad = grad * (1.0 - (logits / softcap) * (logits / softcap))
    return tl.where(row_mask[:, None] & col_mask[None, :], grad, 0.0)


@triton.jit
def _h_slice(ptr, index, stride, offs_h, index_mask, h_mask, EMULATE_BF16: tl.constexpr):
    """`ptr[index, offs_h]` as a dot operand (`[len(index), BLOCK_H]`; fp32 where bf16 is emulated)."""
    x = tl.load(ptr + index[:, None] * stride + offs_h[None, :], mask=index_mask[:, None] & h_mask[None, :], other=0.0)
    if EMULATE_BF16:
        x = x.to(tl.float32)
    return x


@triton.jit
def _as_operand(grad, hidden_ptr, EMULATE_BF16: tl.constexpr):
    """The products run at the input precision, as PyTorch's `grad_logits @ weight` would."""
    if EMULATE_BF16:
        return round_to_bf16(grad)
    return grad.to(hidden_ptr.dtype.element_ty)


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
        "HAS_DH": lambda args: args["grad_hidden_ptr"] is not None,
        "HAS_DW": lambda args: args["grad_weight_ptr"] is not None,
        "HAS_DB": lambda args: args["grad_bias_ptr"] is not None,
        "EMULATE_BF16": _emulate_bf16,
        "SOFTCAP": lambda args: args["softcap"] is not None,
    }
)
@triton.jit(do_not_specialize=["n_rows"])
def _linear_logprobs_bwd_kernel(
    hidden_ptr,  # [N, H] float, unit stride along H
    weight_ptr,  # [V, H] hidden's dtype, unit stride along H
    bias_ptr,  # [V] hidden's dtype, or None
    labels_ptr,  # [N] int
    rows_ptr,  # [M] int64: rows whose label is not ignored
    lse_ptr,  # [N] fp32 from the forward
    grad_logps_ptr,  # [N] fp32 upstream gradient
    grad_hidden_ptr,  # [N, H] fp32 zeros, contiguous; or None
    grad_weight_ptr,  # [V, H] fp32 zeros, contiguous; or None
    grad_bias_ptr,  # [V] fp32 zeros; or None
    softcap,  # float, or None
    n_rows,  # M; changes every batch, so never a constexpr
    H,
    V,
    stride_hn,
    stride_wv,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DH: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    # Grouped order: GROUP_N row blocks sweep the vocab side by side, so each weight tile is read from L2.
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_N)
    per_group = GROUP_N * tl.cdiv(V, BLOCK_V)
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_row_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    offs_m = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_m < n_rows
    rows = tl.load(rows_ptr + offs_m, mask=row_mask, other=0)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(grad_logps_ptr + rows, mask=row_mask, other=0.0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = offs_v < V

    grad = _grad_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, labels, lse, g, offs_v, col_mask, H, stride_hn, stride_wv,
        BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, EMULATE_BF16, DOT_PRECISION, softcap, SOFTCAP,
    )
    if HAS_DB:
        tl.atomic_add(grad_bias_ptr + offs_v, tl.sum(grad, axis=0), mask=col_mask, sem="relaxed")
    grad = _as_operand(grad, hidden_ptr, EMULATE_BF16)

    offs_v64 = offs_v.to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        if HAS_DH:
            w = _h_slice(weight_ptr, offs_v64, stride_wv, offs_h, col_mask, h_mask, EMULATE_BF16)  # [BV, BH]
            dh = tl.dot(grad, w, input_precision=DOT_PRECISION)  # [BN, BH]
            dh_ptrs = grad_hidden_ptr + rows[:, None] * H + offs_h[None, :]
            tl.atomic_add(dh_ptrs, dh, mask=row_mask[:, None] & h_mask[None, :], sem="relaxed")
        if HAS_DW:
            x = _h_slice(hidden_ptr, rows, stride_hn, offs_h, row_mask, h_mask, EMULATE_BF16)  # [BN, BH]
            dw = tl.dot(tl.trans(grad), x, input_precision=DOT_PRECISION)  # [BV, BH]
            dw_ptrs = grad_weight_ptr + offs_v64[:, None] * H + offs_h[None, :]
            tl.atomic_add(dw_ptrs, dw, mask=col_mask[:, None] & h_mask[None, :], sem="relaxed")


_DETERMINISTIC_HEURISTICS = {
    "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
    "EMULATE_BF16": _emulate_bf16,
    "SOFTCAP": lambda args: args["softcap"] is not None,
}


@triton.heuristics(_DETERMINISTIC_HEURISTICS)
@triton.jit(do_not_specialize=["n_rows"])
def _linear_logprobs_bwd_hidden_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, rows_ptr, lse_ptr, grad_logps_ptr,
    grad_hidden_ptr,  # [N, H] fp32 zeros, contiguous
    softcap, n_rows, H, V, stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr,
    EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Deterministic `grad_hidden`: a program per row block walks the whole vocabulary in order, adding into rows
    no other program touches (plain loads and stores, no atomics)."""
    offs_m = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_m < n_rows
    rows = tl.load(rows_ptr + offs_m, mask=row_mask, other=0)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(grad_logps_ptr + rows, mask=row_mask, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_mask = offs_v < V
        grad = _grad_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, labels, lse, g, offs_v, col_mask, H, stride_hn,
            stride_wv, BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, EMULATE_BF16, DOT_PRECISION, softcap, SOFTCAP,
        )
        grad = _as_operand(grad, hidden_ptr, EMULATE_BF16)
        offs_v64 = offs_v.to(tl.int64)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_mask = offs_h < H
            w = _h_slice(weight_ptr, offs_v64, stride_wv, offs_h, col_mask, h_mask, EMULATE_BF16)
            dh_ptrs = grad_hidden_ptr + rows[:, None] * H + offs_h[None, :]
            dh_mask = row_mask[:, None] & h_mask[None, :]
            dh = tl.load(dh_ptrs, mask=dh_mask, other=0.0) + tl.dot(grad, w, input_precision=DOT_PRECISION)
            tl.store(dh_ptrs, dh, mask=dh_mask)


@triton.heuristics({**_DETERMINISTIC_HEURISTICS, "HAS_DW": lambda args: args["grad_weight_ptr"] is not None,
                    "HAS_DB": lambda args: args["grad_bias_ptr"] is not None})
@triton.jit(do_not_specialize=["n_rows"])
def _linear_logprobs_bwd_weight_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, rows_ptr, lse_ptr, grad_logps_ptr,
    grad_weight_ptr,  # [V, H] fp32 zeros, contiguous; or None
    grad_bias_ptr,  # [V] fp32 zeros; or None
    softcap, n_rows, H, V, stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Deterministic `grad_weight` and `grad_bias`: a program per vocab block walks the rows in order, adding into
    vocab entries no other program touches."""
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = offs_v < V
    offs_v64 = offs_v.to(tl.int64)
    db = tl.zeros([BLOCK_V], dtype=tl.float32)
    for n0 in range(0, n_rows, BLOCK_N):
        offs_m = n0 + tl.arange(0, BLOCK_N)
        row_mask = offs_m < n_rows
        rows = tl.load(rows_ptr + offs_m, mask=row_mask, other=0)
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=0)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        g = tl.load(grad_logps_ptr + rows, mask=row_mask, other=0.0)
        grad = _grad_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, labels, lse, g, offs_v, col_mask, H, stride_hn,
            stride_wv, BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, EMULATE_BF16, DOT_PRECISION, softcap, SOFTCAP,
        )
        if HAS_DB:
            db += tl.sum(grad, axis=0)
        if HAS_DW:
            grad = _as_operand(grad, hidden_ptr, EMULATE_BF16)
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                h_mask = offs_h < H
                x = _h_slice(hidden_ptr, rows, stride_hn, offs_h, row_mask, h_mask, EMULATE_BF16)
                dw_ptrs = grad_weight_ptr + offs_v64[:, None] * H + offs_h[None, :]
                dw_mask = col_mask[:, None] & h_mask[None, :]
                dw = tl.dot(tl.trans(grad), x, input_precision=DOT_PRECISION)
                tl.store(dw_ptrs, tl.load(dw_ptrs, mask=dw_mask, other=0.0) + dw, mask=dw_mask)
    if HAS_DB:
        tl.store(grad_bias_ptr + offs_v, db, mask=col_mask)


def _prepare(hidden, weight, bias):
    # The kernels need unit stride along H only; any row stride is passed through.
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    weight = weight.to(hidden.dtype)
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.to(hidden.dtype).contiguous()
    return hidden, weight, bias


def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    rows: torch.Tensor | None = None,
    config: LinearLogprobsConfig | None = None,
    softcap: float | None = None,
) -> RowLogprobs:
    """Log-probs and log-sum-exps of `labels` under `hidden @ weight.T (+ bias)`.

    Args:
        hidden: `[N, H]` bf16, fp16 or fp32. weight: `[V, H]`, cast to `hidden.dtype`. bias: `[V]` or None.
        labels: `[N]` int, `ignore_index` where no log-prob is wanted.
        rows: `valid_rows(labels, ignore_index)` if the caller already has it (saves a host sync).
        softcap: logits become `softcap * tanh(logits / softcap)` first (Gemma 2), or None.

    Returns:
        `RowLogprobs`, both `[N]` fp32 and 0 on ignored rows.
    """
    hidden, weight, bias = _prepare(hidden, weight, bias)
    labels = labels.contiguous()
    n, h = hidden.shape
    v = weight.shape[0]
    if rows is None:
        rows = valid_rows(labels, ignore_index)
    m = rows.numel()
    logps = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    if m == 0:
        return RowLogprobs(logps, lse)
    cfg = config or linear_fwd_config(hidden.device, hidden.dtype, h, v)
    n_row_blocks = triton.cdiv(m, cfg.block_n)
    splits, per_split = vocab_splits(n_row_blocks, triton.cdiv(v, cfg.block_v), min_programs(cfg, hidden.device))
    lse_part = torch.empty(splits, m, dtype=torch.float32, device=hidden.device)
    label_part = torch.empty(splits, m, dtype=torch.float32, device=hidden.device)
    _linear_logprobs_fwd_kernel[(n_row_blocks, splits)](
        hidden, weight, bias, labels, rows, lse_part, label_part, softcap, m, per_split, h, v,
        hidden.stride(0), weight.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, DOT_PRECISION=dot_precision(hidden.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    row_lse = lse_part[0] if splits == 1 else torch.logsumexp(lse_part, dim=0)
    lse[rows] = row_lse
    logps[rows] = label_part.sum(0) - row_lse
    return RowLogprobs(logps, lse)


def linear_logprobs_bwd(
    grad_logps: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    rows: torch.Tensor | None = None,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool | None = None,
    config: LinearLogprobsConfig | None = None,
    softcap: float | None = None,
    deterministic: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `sum(grad_logps * logps)` for `hidden`, `weight` and `bias`, recomputing the logits.

    Args:
        grad_logps: `[N]` upstream gradient (any float dtype; ignored rows are skipped whatever it holds).
        lse: `[N]` fp32 log-sum-exps from `linear_logprobs_fwd`.
        need_hidden / need_weight / need_bias: which gradients to form (`need_bias` defaults to `bias is not None`).
        softcap: as given to the forward.
        deterministic: no float atomics (each gradient entry summed by one program in a fixed order), so two runs
            are bitwise equal; it recomputes the logits twice instead of once.

    Returns:
        `(grad_hidden [N, H], grad_weight [V, H], grad_bias [V])` in the dtypes of the inputs, None where not needed.
    """
    weight_dtype = weight.dtype
    bias_dtype = None if bias is None else bias.dtype
    hidden, weight, bias = _prepare(hidden, weight, bias)
    labels = labels.contiguous()
    need_bias = bias is not None and (need_bias is None or need_bias)
    n, h = hidden.shape
    v = weight.shape[0]
    if rows is None:
        rows = valid_rows(labels, ignore_index)
    m = rows.numel()
    dev = hidden.device
    # fp32 accumulators: atomics from many programs must not round at 16 bits
    grad_hidden = torch.zeros(n, h, dtype=torch.float32, device=dev) if need_hidden else None
    grad_weight = torch.zeros(v, h, dtype=torch.float32, device=dev) if need_weight else None
    grad_bias = torch.zeros(v, dtype=torch.float32, device=dev) if need_bias else None
    if m and (need_hidden or need_weight or need_bias):
        cfg = config or linear_bwd_config(dev, hidden.dtype, h, v)
        inputs = (hidden, weight, bias, labels, rows, lse.float().contiguous(), grad_logps.float().contiguous())
        sizes = (softcap, m, h, v, hidden.stride(0), weight.stride(0))
        tiles = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                     DOT_PRECISION=dot_precision(hidden.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if deterministic:  # no float atomics: each gradient entry is summed by one program, in a fixed order
            if need_hidden:
                _linear_logprobs_bwd_hidden_kernel[(triton.cdiv(m, cfg.block_n),)](
                    *inputs, grad_hidden, *sizes, **tiles)
            if need_weight or need_bias:
                _linear_logprobs_bwd_weight_kernel[(triton.cdiv(v, cfg.block_v),)](
                    *inputs, grad_weight, grad_bias, *sizes, **tiles)
        else:
            grid = (triton.cdiv(m, cfg.block_n) * triton.cdiv(v, cfg.block_v),)
            _linear_logprobs_bwd_kernel[grid](
                *inputs, grad_hidden, grad_weight, grad_bias, *sizes, GROUP_N=cfg.group_n, **tiles)
    if grad_hidden is not None:
        grad_hidden = grad_hidden.to(hidden.dtype)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight_dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias_dtype)
    return grad_hidden, grad_weight, grad_bias
