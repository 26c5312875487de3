"""Chunked PyTorch log-probs from hidden states: the CPU fallback, never holding more than one chunk of logits.

The launchers have the same signatures as the Triton ones in `kernels/linear_logprobs.py`, so one
autograd Function serves both backends. Forward keeps only the per-token log-sum-exp; backward
recomputes each chunk's logits (the same trade the Triton kernel makes), so the extra memory is one
`[rows, V]` chunk, not `[N, V]`.
"""

from __future__ import annotations

import torch

from mdpo_fast.ops.rows import RowLogprobs

# Bytes of fp32 logits per chunk: small next to the weight, large enough that a chunk's matmul is efficient.
CHUNK_BYTES = 64 << 20
WEIGHT_SLICE = 16384  # vocab rows of the weight gradient computed at a time


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def _chunk_logits(hidden, weight, bias, softcap):
    logits = (hidden @ weight.T).float()  # [rows, V]; matmul in the input dtype, as PyTorch does
    logits = logits if bias is None else logits + bias.float()
    return logits if softcap is None else torch.tanh(logits / softcap).mul_(softcap)


def _cast(hidden, weight, bias):
    return weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)


def chunked_logprobs_fwd(hidden, weight, labels, bias, *, rows, softcap=None) -> RowLogprobs:
    """`RowLogprobs` of the `rows` (the `[M]` indices of rows with a label); `softcap`: logits become
    `softcap * tanh(logits / softcap)` first, or None."""
    w, b = _cast(hidden, weight, bias)
    logps = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    lse = torch.zeros_like(logps)
    step = chunk_rows(weight.shape[0])
    for start in range(0, rows.numel(), step):
        idx = rows[start : start + step]
        logits = _chunk_logits(hidden[idx], w, b, softcap)
        chunk_lse = torch.logsumexp(logits, dim=-1)
        lse[idx] = chunk_lse
        logps[idx] = logits.gather(1, labels[idx, None]).squeeze(1) - chunk_lse
        del logits
    return RowLogprobs(logps, lse)


def chunked_logprobs_bwd(grad_logps, hidden, weight, labels, lse, bias, *, rows, need_hidden, need_weight, need_bias,
                         softcap=None, deterministic=False):
    """Gradients of `sum(grad_logps * logps)` for hidden, weight and bias (None where not needed). Deterministic
    whatever `deterministic` says: every sum runs in one fixed order."""
    w, b = _cast(hidden, weight, bias)
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
    step = chunk_rows(weight.shape[0])
    for start in range(0, rows.numel(), step):
        idx = rows[start : start + step]
        h = hidden[idx]
        g = grad_logps[idx].float()
        # d logp / d logits = onehot(label) - softmax, scaled per token by the upstream gradient
        logits = _chunk_logits(h, w, b, softcap)
        grad_logits = (logits - lse[idx, None]).exp_().mul_(-g[:, None])
        grad_logits.scatter_add_(1, labels[idx, None], g[:, None])
        if softcap is not None:  # through the cap: d(c tanh(x / c)) / dx = 1 - tanh^2
            grad_logits.mul_(1 - (logits / softcap).square_())
        del logits
        if need_bias:
            grad_bias += grad_logits.sum(0)
        grad_logits = grad_logits.to(hidden.dtype)
        if need_hidden:
            grad_hidden[idx] = grad_logits @ w
        if need_weight:  # by vocab slices: one `grad_logits.T @ h` would be a [V, H] temporary per chunk
            for v0 in range(0, weight.shape[0], WEIGHT_SLICE):
                grad_weight[v0 : v0 + WEIGHT_SLICE] += grad_logits[:, v0 : v0 + WEIGHT_SLICE].T @ h
        del grad_logits
    if need_weight:
        grad_weight = grad_weight.to(weight.dtype)
    if need_bias:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias
