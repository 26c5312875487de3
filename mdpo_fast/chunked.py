"""Chunked PyTorch log-probs from hidden states: the CPU fallback, never holding more than one chunk of logits.

Forward keeps only the per-token log-sum-exp; backward recomputes each chunk's logits (the same
trade the Triton kernel makes), so extra memory is one `[rows, V]` chunk, not `[N, V]`.
"""

from __future__ import annotations

import torch

# Bytes of fp32 logits per chunk: small next to the weight, large enough that a chunk's matmul is efficient.
CHUNK_BYTES = 64 << 20


def chunk_rows(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * vocab_size))


def _chunk_logits(hidden, weight, bias):
    logits = (hidden @ weight.T).float()  # [rows, V]; matmul in the input dtype, as PyTorch does
    return logits if bias is None else logits + bias.float()


class ChunkedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int):
        # hidden [N, H], weight [V, H], bias [V] | None, labels [N]
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        rows_idx = (labels != ignore_index).nonzero().squeeze(1)  # ignored rows cost no work
        logps = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        lse = torch.zeros_like(logps)
        step = chunk_rows(weight.shape[0])
        for start in range(0, rows_idx.numel(), step):
            rows = rows_idx[start : start + step]
            logits = _chunk_logits(hidden[rows], w, b)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            lse[rows] = chunk_lse
            logps[rows] = logits.gather(1, labels[rows, None]).squeeze(1) - chunk_lse
            del logits
        ctx.save_for_backward(hidden, weight, bias, labels, rows_idx, lse)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, labels, rows_idx, lse = ctx.saved_tensors
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        step = chunk_rows(weight.shape[0])
        for start in range(0, rows_idx.numel(), step):
            rows = rows_idx[start : start + step]
            h = hidden[rows]
            g = grad_logps[rows].float()
            # d logp / d logits = onehot(label) - softmax, scaled per token by the upstream gradient
            grad_logits = _chunk_logits(h, w, b).sub_(lse[rows, None]).exp_().mul_(-g[:, None])
            grad_logits.scatter_add_(1, labels[rows, None], g[:, None])
            if need_b:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(hidden.dtype)
            if need_h:
                grad_hidden[rows] = grad_logits @ w
            if need_w:
                grad_weight += grad_logits.T @ h
            del grad_logits
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        if need_b:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def linear_token_logprobs_chunked(hidden, weight, labels, ignore_index: int = -100, bias=None) -> torch.Tensor:
    return ChunkedLinearLogprobs.apply(hidden, weight, bias, labels, ignore_index)
