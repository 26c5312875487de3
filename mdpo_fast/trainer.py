"""Layer 6: `transformers.Trainer` drives the loop; this subclass only adds the batch layout and the loss."""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from mdpo_fast.collate import PaddedCollator
from mdpo_fast.fused_loss import fused_linear_mdpo_loss
from mdpo_fast.loss import METRIC_NAMES
from mdpo_fast.modeling import answer_tokens, padded_branch_logps, reference_context, unwrap


class MDPOTrainer(Trainer):
    """mDPO training.

    Args:
        model: the policy; a peft model whose adapters are switched off for the reference, unless
            `reference_model` is given (full fine-tuning).
        args: an `MDPOConfig`.
        train_dataset: a `PreferenceDataset` (see `prepare_dataset`).
        processing_class: the model's processor; saved with every checkpoint.
    """

    def __init__(self, model, args, train_dataset, processing_class, reference_model=None, **kwargs):
        pad_id = processing_class.tokenizer.pad_token_id
        kwargs.setdefault("data_collator", PaddedCollator(pad_id if pad_id is not None else 0))
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, processing_class=processing_class, **kwargs
        )
        self.reference_model = reference_model
        if reference_model is not None:
            reference_model.to(self.args.device)
        self.loss_is_scaled_for_ga = False  # the loss is a per-example mean: Trainer divides by accumulation steps
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ref_logps = ref_hidden = None
        with reference_context(model, self.reference_model):
            if self.reference_model is None:  # LoRA: same LM head, so the reference rows join the fused launch
                ref_hidden = answer_tokens(model, inputs)[0]
            else:
                ref_logps = padded_branch_logps(self.reference_model, inputs)
        hidden, labels, segment_ids, num_examples = answer_tokens(model, inputs)
        head = unwrap(model).get_output_embeddings()
        args = self.args
        loss, metrics = fused_linear_mdpo_loss(
            hidden, head.weight, labels, segment_ids, ref_logps, ref_hidden=ref_hidden, bias=head.bias,
            num_examples=num_examples, beta=args.beta, anchor=args.anchor, weights=args.loss_weights,
        )
        for name in METRIC_NAMES:
            self._metrics[name].append(metrics[name])
        return (loss, metrics) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:  # training logs: mean of the metrics since the last log
            logs.update({k: torch.stack(v).mean().item() for k, v in self._metrics.items()})
            self._metrics.clear()
        super().log(logs, start_time)
