"""The whole mDPO loss from hidden states and the LM-head weight in one call, without `[N, V]` logits.

Forward: one launch over every answer token of every branch (and of the reference, when its hidden
states are given) yields per-token log-probs and log-sum-exps; they are summed per segment, the
`[B, 3]` mDPO loss is formed and differentiated on the spot, which gives each token its upstream
gradient. Backward: one launch recomputes the logit tiles and forms `d_hidden`, `d_weight`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mdpo_fast.ops.backend import LinearOps, linear_ops
from mdpo_fast.ops.logprobs import check_linear_inputs, deterministic_backward, segment_logps
from mdpo_fast.ops.loss import NUM_BRANCHES, check_loss_options, mdpo_objective
from mdpo_fast.ops.rows import valid_rows


@dataclass(frozen=True)
class MDPOLossOptions:
    ops: LinearOps
    num_examples: int
    beta: float = 0.1
    anchor: float = 0.0
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ignore_index: int = -100
    softcap: float | None = None
    deterministic: bool | None = None


class FusedLinearMDPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, segment_ids, ref_logps, ref_hidden, opts: MDPOLossOptions):
        # hidden [N, H], weight [V, H], bias [V] | None, labels [N], segment_ids [N], ref_logps [B, 3] | None,
        # ref_hidden [N, H] | None
        n, b = hidden.shape[0], opts.num_examples
        labels = torch.where(segment_ids >= 0, labels, opts.ignore_index)  # outside every answer: no work
        rows = valid_rows(labels, opts.ignore_index)
        if ref_hidden is not None:  # policy and reference rows in one launch: each weight tile serves both
            both = torch.cat([hidden, ref_hidden.to(hidden.dtype)])
            logps, lse = opts.ops.fwd(both, weight, labels.repeat(2), bias, rows=torch.cat([rows, rows + n]),
                                      softcap=opts.softcap)
            ref_logps = segment_logps(logps[n:], segment_ids, b)
            logps, lse = logps[:n], lse[:n]
        else:
            logps, lse = opts.ops.fwd(hidden, weight, labels, bias, rows=rows, softcap=opts.softcap)
        policy_logps = segment_logps(logps, segment_ids, b)
        with torch.enable_grad():  # the [B, 3] loss is tiny: its gradient gives every token's upstream gradient
            leaf = policy_logps.detach().requires_grad_(True)
            loss, metrics = mdpo_objective(leaf, ref_logps, opts.beta, opts.anchor, opts.weights)
            (grad_policy,) = torch.autograd.grad(loss, leaf)
        token_grad = grad_policy.flatten()[segment_ids.clamp(min=0)]  # [N]; rows without a label are skipped
        ctx.save_for_backward(hidden, weight, bias, labels, rows, lse, token_grad)
        ctx.opts = opts
        # a dict is passed through untracked: the metrics and log-probs carry no gradient
        return loss.detach(), {**metrics, "policy_logps": policy_logps, "ref_logps": ref_logps}

    @staticmethod
    def backward(ctx, grad_loss, _metrics):
        hidden, weight, bias, labels, rows, lse, token_grad = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = ctx.opts.ops.bwd(
            token_grad * grad_loss, hidden, weight, labels, lse, bias, rows=rows,
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias, softcap=ctx.opts.softcap,
            deterministic=deterministic_backward(ctx.opts.deterministic),
        )
        return *grads, None, None, None, None, None


def _check_segments(segment_ids, n: int, num_examples: int | None, check_range: bool = True) -> int:
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dim() != 1 or segment_ids.is_floating_point():
        raise ValueError("segment_ids must be a 1-D integer tensor (3 * example + branch, -1 outside answers)")
    if segment_ids.shape[0] != n:
        raise ValueError(f"segment_ids has {segment_ids.shape[0]} entries but hidden has {n} rows")
    if not check_range and num_examples is not None:
        return num_examples
    low, high = (int(x) for x in segment_ids.aminmax()) if n else (-1, -1)
    if num_examples is None:
        if high < 0:
            raise ValueError("segment_ids has no segment; pass ref_logps or num_examples")
        num_examples = high // NUM_BRANCHES + 1
    if low < -1 or high >= NUM_BRANCHES * num_examples:
        raise ValueError(
            f"segment_ids must lie in [-1, {NUM_BRANCHES * num_examples}) for {num_examples} examples, "
            f"got values in [{low}, {high}]"
        )
    return num_examples


def fused_linear_mdpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    anchor: float = 0.0,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    ignore_index: int = -100,
    ref_hidden: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    num_examples: int | None = None,
    softcap: float | None = None,
    check_ranges: bool = True,
    deterministic: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mDPO loss (docs/DESIGN.md, "The objective, exactly") straight from hidden states, for all three branches
    of all examples at once.

    Args:
        hidden: `[N, H]` policy hidden states of the tokens that predict `labels`, every branch of every
            example packed back to back in any order.
        weight: `[V, H]` LM-head weight (and `bias`, `[V]`, if the head has one).
        labels: `[N]` next-token ids; `ignore_index` where no log-prob counts.
        segment_ids: `[N]` `3 * example + branch` (0 chosen, 1 rejected, 2 corrupted), -1 outside answers.
        ref_logps: `[B, 3]` reference sequence log-probs (e.g. precomputed); or None with `ref_hidden`.
        ref_hidden: `[N, H]` reference hidden states of the same tokens, when the reference shares this LM
            head (LoRA with adapters disabled): its log-probs come from the same launch, without gradient.
        num_examples: B when neither `ref_logps` gives it nor it should be read off `segment_ids`.
        softcap: the model's final logit soft-capping (`softcap * tanh(logits / softcap)`, Gemma 2), or None.
        check_ranges: read the ranges of `labels` and `segment_ids` on the host to refuse out-of-range values
            (device syncs on GPU); a caller whose ids are right by construction and that gives `num_examples` may
            skip it. Shapes, dtypes and devices are checked either way.
        deterministic: a backward bitwise equal from run to run (`linear_token_logprobs`); None follows
            `torch.are_deterministic_algorithms_enabled()`.

    Returns:
        `(loss, metrics)`: the 0-d loss, differentiable in `hidden`, `weight` and `bias`; metrics as in
        `mdpo_loss`, plus `"policy_logps"` and `"ref_logps"` (`[B, 3]`, detached).

    Example (two examples, packed; tokens of example 1's corrupted branch first):
        >>> h, w = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8)
        >>> labels, seg = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([5, 0, 1, 2, 3, 4])
        >>> loss, metrics = fused_linear_mdpo_loss(h, w, labels, seg, torch.zeros(2, 3))
        >>> loss.backward()
    """
    check_linear_inputs(hidden, weight, labels, ignore_index, bias, softcap, check_ranges)
    w_all = check_loss_options(beta, weights)
    if ref_logps is None and ref_hidden is None:
        raise ValueError("give ref_logps ([B, 3]) or ref_hidden ([N, H])")
    if ref_logps is not None and ref_hidden is not None:
        raise ValueError("give ref_logps or ref_hidden, not both")
    if ref_hidden is not None and (not isinstance(ref_hidden, torch.Tensor) or ref_hidden.shape != hidden.shape):
        raise ValueError(f"ref_hidden must have hidden's shape {tuple(hidden.shape)}")
    if ref_logps is not None:
        if not isinstance(ref_logps, torch.Tensor) or ref_logps.dim() != 2 or ref_logps.shape[1] != NUM_BRANCHES:
            raise ValueError("ref_logps must be a [B, 3] tensor (chosen, rejected, corrupted)")
        num_examples = ref_logps.shape[0] if num_examples is None else num_examples
        if ref_logps.shape[0] != num_examples:
            raise ValueError(f"ref_logps has {ref_logps.shape[0]} rows but num_examples is {num_examples}")
        ref_logps = ref_logps.detach().float()
    num_examples = _check_segments(segment_ids, hidden.shape[0], num_examples, check_ranges)
    opts = MDPOLossOptions(linear_ops(hidden.device), num_examples, beta, anchor, w_all, ignore_index, softcap,
                           deterministic)
    return FusedLinearMDPOLoss.apply(hidden, weight, bias, labels, segment_ids, ref_logps, ref_hidden, opts)
