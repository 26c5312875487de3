"""Per-token log-probs for callers that already hold `[N, V]` logits: one pass each way.

Forward: one program per row streams the vocab once (online max / sum-exp) and reads the label's logit.
Backward: one program per (row, vocab block) writes `g * (onehot(label) - softmax)` from the saved
log-sum-exp, in the logits dtype. The plain reference is `mdpo_fast.ops.naive.token_logprobs_naive`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mdpo_fast.ops.kernels.config import LogitsLogprobsConfig, emulate_bf16, logits_config
from mdpo_fast.ops.kernels.linear_logprobs import round_to_bf16


@triton.jit
def _logits_logprobs_fwd_kernel(
    logits_ptr,  # [N, V] float, unit stride along V
    labels_ptr,  # [N] int
    logps_ptr,  # [N] fp32
    lse_ptr,  # [N] fp32
    V,
    stride_n,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label != ignore_index:
        row_ptr = logits_ptr + row * stride_n
        m_i = float("-inf")
        s_i = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + offs_v, mask=offs_v < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(x, axis=0))
            s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m_i = m_new
        lse = m_i + tl.log(s_i)
        tl.store(lse_ptr + row, lse)
        tl.store(logps_ptr + row, tl.load(row_ptr + label).to(tl.float32) - lse)
    else:
        tl.store(lse_ptr + row, 0.0)
        tl.store(logps_ptr + row, 0.0)


@triton.heuristics({"EMULATE_BF16": lambda args: emulate_bf16(args["grad_logits_ptr"])})
@triton.jit
def _logits_logprobs_bwd_kernel(
    logits_ptr,  # [N, V] float, unit stride along V
    labels_ptr,  # [N] int
    lse_ptr,  # [N] fp32 from the forward
    grad_logps_ptr,  # [N] fp32 upstream gradient
    grad_logits_ptr,  # [N, V] logits dtype, contiguous
    V,
    stride_n,
    ignore_index,
    BLOCK_V: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = offs_v < V
    out_ptrs = grad_logits_ptr + row * V + offs_v
    label = tl.load(labels_ptr + row)
    if label != ignore_index:
        x = tl.load(logits_ptr + row * stride_n + offs_v, mask=col_mask, other=0.0).to(tl.float32)
        g = tl.load(grad_logps_ptr + row)
        # d logp / d logits = onehot(label) - softmax
        grad = g * (tl.where(offs_v == label, 1.0, 0.0) - tl.exp(x - tl.load(lse_ptr + row)))
        if EMULATE_BF16:
            grad = round_to_bf16(grad)
        tl.store(out_ptrs, grad.to(grad_logits_ptr.dtype.element_ty), mask=col_mask)
    else:
        tl.store(out_ptrs, tl.zeros([BLOCK_V], dtype=grad_logits_ptr.dtype.element_ty), mask=col_mask)


def logits_logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    config: LogitsLogprobsConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logps, lse)`, both `[N]` fp32 and 0 on ignored rows, from `[N, V]` logits and `[N]` labels."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    labels = labels.contiguous()
    n, v = logits.shape
    logps = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return logps, lse
    cfg = config or logits_config(logits.device, v)
    _logits_logprobs_fwd_kernel[(n,)](
        logits, labels, logps, lse, v, logits.stride(0), ignore_index, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps
    )
    return logps, lse


def logits_logprobs_bwd(
    grad_logps: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int = -100,
    config: LogitsLogprobsConfig | None = None,
) -> torch.Tensor:
    """`[N, V]` gradient of `sum(grad_logps * logps)` for the logits, in their dtype; 0 on ignored rows."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    labels = labels.contiguous()
    n, v = logits.shape
    grad_logits = torch.empty(n, v, dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad_logits
    cfg = config or logits_config(logits.device, v)
    _logits_logprobs_bwd_kernel[(n, triton.cdiv(v, cfg.block_v))](
        logits, labels, lse.float().contiguous(), grad_logps.float().contiguous(), grad_logits, v, logits.stride(0),
        ignore_index, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
    )  # fmt: skip
    return grad_logits


@dataclass(frozen=True)
class LogitsLogprobsOptions:
    ignore_index: int = -100
    fwd_config: LogitsLogprobsConfig | None = None  # None: the default for the device and vocab size
    bwd_config: LogitsLogprobsConfig | None = None


class LogitsLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, opts: LogitsLogprobsOptions):
        logps, lse = logits_logprobs_fwd(logits, labels, opts.ignore_index, opts.fwd_config)
        ctx.save_for_backward(logits, labels, lse)
        ctx.opts = opts
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        logits, labels, lse = ctx.saved_tensors
        grad_logits = logits_logprobs_bwd(grad_logps, logits, labels, lse, ctx.opts.ignore_index, ctx.opts.bwd_config)
        return grad_logits, None, None


def triton_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token `log softmax(logits)[label]` in fp32, 0 where `labels == ignore_index`, as `token_logprobs_naive`.

    Args:
        logits: `[N, V]` bf16, fp16 or fp32 (any row stride).
        labels: `[N]` integer token ids.

    Returns:
        `[N]` float32, differentiable in `logits`.
    """
    return LogitsLogprobsFunction.apply(logits, labels, LogitsLogprobsOptions(ignore_index))
