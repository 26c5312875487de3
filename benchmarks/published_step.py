"""The published mDPO training step, reimplemented faithfully as the baseline of the step benchmark.

As mDPO's trainer does it (a TRL DPOTrainer subclass): chosen and rejected padded together into one
forward, the corrupted-image branch in a second, fp32 logits materialised for every position, log-probs
gathered from a full log-softmax, every image re-encoded in every forward, and both forwards again
with adapters disabled for the reference. Same objective (`mdpo_loss`), so only the data flow differs.
Without the corrupted branch (plain DPO) it is TRL's DPO step: the first forward alone.
"""

from __future__ import annotations

import torch

from mdpo_fast.collate import IGNORE_INDEX, BatchStats, image_inputs, pad_rows
from mdpo_fast.families import family_for
from mdpo_fast.modeling import reference_context, unwrap
from mdpo_fast.ops.loss import mdpo_loss
from mdpo_fast.trainer import MDPOTrainer


class PublishedCollator:
    def __init__(self, pad_token_id: int, family=None, config=None):
        self.pad_token_id = pad_token_id
        self.family, self.config = family, config  # the model's per-token inputs (token types)

    def __call__(self, items):
        exs = [it["example"] for it in items]
        pair = pad_rows([(e.prompt_ids, e.chosen_ids) for e in exs] + [(e.prompt_ids, e.rejected_ids) for e in exs],
                       [it["image"] for it in items] * 2, self.pad_token_id, self.family, self.config)
        batch = {"pair": pair}
        if "corrupted_image" in items[0]:  # plain DPO (no corrupted branch): TRL's DPO step
            batch["corrupted"] = pad_rows([(e.prompt_ids, e.chosen_ids) for e in exs],
                                          [it["corrupted_image"] for it in items], self.pad_token_id, self.family,
                                          self.config)
        tokens = sum(b["input_ids"].numel() for b in batch.values())
        real = int(sum(b["attention_mask"].sum() for b in batch.values()))
        images = sum(b["input_ids"].shape[0] for b in batch.values())  # each row encodes its image
        batch["stats"] = BatchStats(real, tokens - real, images)
        return batch


def sequence_logps(model, batch) -> torch.Tensor:
    """Sum of answer-token log-probs per row, from full fp32 logits."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **image_inputs(batch),
              **batch.get("text_inputs", {})}
    logits = model(**inputs, use_cache=False).logits.to(torch.float32)  # [rows, T, V]
    labels = batch["labels"][:, 1:].clone()
    mask = labels != IGNORE_INDEX
    labels[~mask] = 0
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, labels[..., None]).squeeze(2)
    return (logp * mask).sum(-1)


def published_logps(model, batch) -> torch.Tensor:
    pair = sequence_logps(model, batch["pair"])
    b = pair.shape[0] // 2
    corrupted = sequence_logps(model, batch["corrupted"]) if "corrupted" in batch else torch.zeros_like(pair[:b])
    return torch.stack([pair[:b], pair[b:], corrupted], dim=1)


class PublishedStepTrainer(MDPOTrainer):
    """`MDPOTrainer` with the published step's data flow; the loop, optimizer and loss are the same."""

    def __init__(self, model, args, train_dataset, processing_class, **kwargs):
        pad_id = processing_class.tokenizer.pad_token_id or 0
        config = unwrap(model).config
        super().__init__(model, args, train_dataset, processing_class,
                         data_collator=PublishedCollator(pad_id, family_for(config), config), **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with reference_context(model, self.reference_model):
            ref_logps = published_logps(self.reference_model or model, inputs)
        policy_logps = published_logps(model, inputs)
        a = self.args
        loss, metrics = mdpo_loss(policy_logps, ref_logps, beta=a.beta, anchor=a.anchor, weights=a.loss_weights)
        self.count_batch(inputs["stats"], live_reference=True)
        return (loss, metrics) if return_outputs else loss
