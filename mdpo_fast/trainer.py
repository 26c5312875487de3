"""Layer 6: `transformers.Trainer` drives the loop; this subclass only adds the batch layout and the loss."""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from mdpo_fast.collate import PaddedCollator
from mdpo_fast.loss import mdpo_loss
from mdpo_fast.modeling import padded_branch_logps, reference_context


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
        with reference_context(model, self.reference_model):
            ref_logps = padded_branch_logps(self.reference_model or model, inputs)
        policy_logps = padded_branch_logps(model, inputs)
        args = self.args
        loss, metrics = mdpo_loss(
            policy_logps, ref_logps, beta=args.beta, anchor=args.anchor, weights=args.loss_weights
        )
        for name, value in metrics.items():
            self._metrics[name].append(value)
        return (loss, {"policy_logps": policy_logps, "ref_logps": ref_logps}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:  # training logs: mean of the metrics since the last log
            logs.update({k: torch.stack(v).mean().item() for k, v in self._metrics.items()})
            self._metrics.clear()
        super().log(logs, start_time)
