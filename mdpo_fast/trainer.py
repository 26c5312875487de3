"""Layer 6: `transformers.Trainer` drives the loop; this subclass adds the batch layout (and the packed rows'
attention, decided once), the reference log-probs (precomputed once or live), the loss and its metrics, the
held-out evaluation, a stop before the optimizer step on a non-finite loss, and checkpoints written whole."""

from __future__ import annotations

import glob
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch
import transformers.trainer as hf_trainer
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from mdpo_fast import ref_cache
from mdpo_fast.collate import BatchStats, PaddedCollator
from mdpo_fast.families.base import image_token_id, packed_layout_refusal, trainable_family
from mdpo_fast.heldout import ReferenceSwap, SetLogps, heldout_metrics, reference_swap
from mdpo_fast.layout_check import LayoutMismatchError, check_layout
from mdpo_fast.modeling import (
    AnswerTokens,
    choose_packed_attention,
    image_features,
    lm_head,
    logit_softcap,
    packed_answer_tokens,
    padded_answer_tokens,
    reference_context,
    sequence_logps,
    unwrap,
)
from mdpo_fast.ops.fused_loss import fused_linear_mdpo_loss
from mdpo_fast.ops.loss import NUM_BRANCHES, logged_metrics
from mdpo_fast.packing import PackedCollator, packed_length, rows_too_long
from mdpo_fast.records import DataError
from mdpo_fast.sampler import LengthGroupedSampler

STAGING_PREFIX = "staging-checkpoint"
logger = logging.getLogger("mdpo_fast")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; raised before the optimizer step, so no weight or checkpoint sees it."""


class MDPOTrainer(Trainer):
    """mDPO training.

    Args:
        model: the policy; a peft model whose adapters are switched off for the reference, unless
            `reference_model` is given (full fine-tuning).
        args: an `MDPOConfig`; `packing`, `prefix_sharing`, `max_tokens_per_batch`, `packed_attention` choose the
            layout; with `precompute_ref_logps`, `train()` first runs `precompute_reference()`.
        train_dataset: a `PreferenceDataset` (see `prepare_dataset`).
        processing_class: the model's processor; saved with every checkpoint.
    """

    def __init__(self, model, args, train_dataset, processing_class, reference_model=None, **kwargs):
        pad_id = processing_class.tokenizer.pad_token_id or 0
        config = unwrap(model).config
        self.family = trainable_family(config)
        refusal = packed_layout_refusal(config)
        if "data_collator" not in kwargs and args.packing and refusal:
            logger.warning("packing off, training in the padded layout: %s", refusal)
            args.packing = False
        if args.num_branches == NUM_BRANCHES and not train_dataset.corrupted:
            raise ValueError("the training set was prepared without corrupted images, which this run's loss_weights "
                             "(or imageless_metrics) need: prepare it with the same configuration")
        # what the batch layout needs (`collator`), decided here once
        self.pad_token_id, self.model_config, self.packed_attention = pad_id, config, None
        if args.packing:
            for m in (model, reference_model):
                if m is not None:
                    self.packed_attention = choose_packed_attention(m, args.packed_attention, args.device)
        # Refused before the model moves to the device: a token the model cannot embed or score (on a GPU, a
        # device-side assert or a wrong log-prob), and with packing an example that cannot fit one row.
        sets = [data for data in (train_dataset, kwargs.get("eval_dataset")) if data is not None]
        problems = [problem for data in sets for problem in data.tokens_outside(config.get_text_config().vocab_size)]
        if args.packing:
            problems += [problem for data in sets for problem in rows_too_long(
                data.examples, args.max_tokens_per_batch, args.prefix_sharing, args.num_branches)]
        if problems:
            raise DataError(problems)
        kwargs.setdefault("data_collator", self.collator(args, args.num_branches))
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, processing_class=processing_class, **kwargs
        )
        if args.packing and self.is_fsdp_enabled:
            raise ValueError("packing runs the vision tower outside the model's forward (once per image), where FSDP "
                             "keeps them sharded: use --packing false with FSDP (or DDP / DeepSpeed with packing)")
        self.reference_model = reference_model
        if reference_model is not None:
            reference_model.to(self.args.device)
        self.layout_checked = False
        self.reference_precomputed = False
        self.reference_released = False  # a full fine-tuning copy let go after precomputing
        self.loss_is_scaled_for_ga = False  # the loss is a per-example mean: Trainer divides by accumulation steps
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.image_swaps: dict[int, ReferenceSwap] = {}  # per held-out set (`heldout.reference_swap`)

    def collator(self, args, num_branches: int):
        """The batch layout `args` chooses (packed or padded rows) for the first `num_branches` branches."""
        pad_id, config = self.pad_token_id, self.model_config
        if not args.packing:
            return PaddedCollator(pad_id, self.family, config, num_branches)
        dense = self.packed_attention in ("sdpa", "eager")  # one mask per row: masked work still done
        return PackedCollator(pad_id, image_token_id(config), args.max_tokens_per_batch, args.prefix_sharing,
                              dense_hidden_size=config.get_text_config().hidden_size if dense else None,
                              family=self.family, config=config, num_branches=num_branches)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset or self.train_dataset
        lengths = [packed_length(ex, self.args.prefix_sharing, self.args.num_branches) for ex in dataset.examples]
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        # Grouped by the global batch: processes take consecutive per-device slices of each step, so a step
        # holds the same examples whatever the number of processes.
        return LengthGroupedSampler(lengths, self.args.per_device_train_batch_size * self.args.world_size, seed)

    def check_layout(self, batch: dict | None = None, model=None) -> None:
        """The layout's reference log-probs of two examples of `batch` (the first training batch if None) against
        the model's own plain forward of the same sequences (`layout_check`); raises `LayoutMismatchError` if they
        differ. Once per trainer: before reference log-probs are precomputed, else at the first step (where
        FSDP and DeepSpeed have placed the model)."""
        if self.layout_checked:
            return
        if batch is None:
            batch = self._prepare_inputs(next(iter(self.get_train_dataloader())))
        rows = [self.train_dataset.row_of(int(i)) for i in batch["example_index"]]
        model = model or self.model
        error = None
        with reference_context(model, self.reference_model):
            target = self.reference_model or model
            tokens = self.answer_tokens(target, batch)
            logps = sequence_logps(target, tokens)
            # the compute dtype: mixed precision's (fp32 weights with --bf16: accelerate autocasts the model's
            # forward), else the hidden states' (bf16 weights)
            mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision)
            dtype = mixed or tokens.hidden.dtype
            try:
                check_layout(target, self.processing_class, self.family, self.train_dataset, rows, logps,
                             "packed" if self.args.packing else "padded", dtype, self.args.num_branches)
            except LayoutMismatchError as e:
                error = e
        failed = torch.tensor(float(error is not None), device=logps.device)
        if self.args.world_size > 1:  # every process stops together, none waits in a collective
            failed = self.accelerator.reduce(failed, reduction="sum")
        if failed.item():
            raise error or LayoutMismatchError("the layout check failed on another process (see its message)")
        self.layout_checked = True

    def answer_tokens(self, model, inputs, features=None) -> AnswerTokens:
        """The batch's answer tokens in this run's layout (`features`: the packed batch's images, if encoded)."""
        if not self.args.packing:
            return padded_answer_tokens(model, inputs)
        return packed_answer_tokens(model, inputs, image_features(model, inputs) if features is None else features)

    def branch_logps(self, dataset, num_branches: int, policy: bool = True, reference: bool = True) -> SetLogps:
        """The summed answer log-probs of `dataset`'s examples (their first `num_branches` branches, in this run's
        layout), gathered over processes. The policy's in eval mode (zeros unless `policy`); the reference's read
        from the set's precomputed cache where it has one, else computed if `reference` (else zeros)."""
        loader = self.accelerator.prepare(torch.utils.data.DataLoader(
            dataset, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.collator(self.args, num_branches),
            num_workers=self.args.dataloader_num_workers))
        model, parts = self.model, []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in loader:
                    features = image_features(model, batch) if self.args.packing else None
                    n = batch["example_index"].shape[0]
                    mine = sequence_logps(model, self.answer_tokens(model, batch, features)) if policy else None
                    ref = batch.get("ref_logps")
                    if ref is None and reference:
                        ref = self.reference_logps(batch, features)
                    zeros = torch.zeros(n, NUM_BRANCHES, device=batch["example_index"].device)
                    parts.append((batch["example_index"], zeros if mine is None else mine.float(),
                                  zeros if ref is None else ref.float()))
        finally:
            model.train(was_training)
        indices, mine, ref = (torch.cat(column) for column in zip(*parts, strict=True))
        return SetLogps(*(t.cpu() for t in self.accelerator.gather_for_metrics((indices, mine, ref))))

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The objective's metrics on the held-out set and the image reliance of the policy and of the reference
        (`heldout.heldout_metrics`), logged and returned with `metric_key_prefix`, as Trainer's own evaluation
        does (so `eval_strategy`, `load_best_model_at_end` and `metric_for_best_model` work on them)."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if dataset is None:
            raise ValueError("no held-out set: pass --eval_dataset or --eval_split")
        if dataset is not self.eval_dataset:  # a set not checked when the trainer was built
            problems = dataset.tokens_outside(self.model_config.get_text_config().vocab_size)
            if problems:
                raise DataError(problems)
        self.check_layout()
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in heldout_metrics(self, dataset).metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def train(self, *args, **kwargs):
        """Trainer's `train`, after `precompute_reference` when `precompute_ref_logps` is set."""
        if self.args.precompute_ref_logps:
            self.precompute_reference()
        return super().train(*args, **kwargs)

    def precompute_reference(self) -> None:
        """The reference log-probs of the training set and of the held-out set computed once, before training:
        kept in `output_dir/ref_logps/<fingerprint>/` (read back by a rerun or a resumed run, which computes only
        what an interrupted pass left), then carried by the sets' batches, so no step runs a reference forward.
        Also the held-out set's image swap of the reference (`heldout.reference_swap`); then a full fine-tuning
        run's frozen reference copy is let go. Once per trainer."""
        if self.reference_precomputed:
            return
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("precompute_ref_logps runs before DeepSpeed / FSDP place the model: use "
                             "--precompute_ref_logps false there (the reference is then computed each step)")
        self.check_layout()  # nothing is cached from a layout that disagrees with the model's own forward
        args = self.args
        # Training's in the first epoch's step order, the held-out set's in evaluation's order and batches: with
        # one process the reference sees the same rows as the policy will, so before the first update (policy ==
        # reference) the rewards are exact zeros, as with a live reference.
        sets = [(self.train_dataset, list(self._get_train_sampler()), args.per_device_train_batch_size, "")]
        if self.eval_dataset is not None:
            held = self.eval_dataset
            sets.append((held, range(len(held)), args.per_device_eval_batch_size, " (held out)"))

        def logps(batch) -> ref_cache.BatchLogps:
            batch = self._prepare_inputs(batch)
            return ref_cache.BatchLogps(batch["example_index"], self.reference_logps(batch))

        for dataset, order, batch_size, which in sets:
            def make_loader(positions, dataset=dataset, batch_size=batch_size):
                return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, positions), batch_size=batch_size,
                                                   collate_fn=self.data_collator,
                                                   num_workers=args.dataloader_num_workers)

            directory = Path(args.output_dir) / "ref_logps" / ref_cache.fingerprint(args, dataset.examples)
            dataset.ref_logps = ref_cache.precompute(dataset, order, directory, self.accelerator, make_loader, logps,
                                                     "reference log-probs" + which)
        if self.eval_dataset is not None:
            reference_swap(self, self.eval_dataset)  # while a full fine-tuning run still holds its reference
        self.reference_released = self.reference_model is not None
        self.reference_model = None  # no longer needed: frees the full fine-tuning copy (the caller keeps none)
        self.reference_precomputed = True

    def reference_logps(self, inputs, features=None) -> torch.Tensor:
        """`[B, 3]` reference log-probs of a batch through the reference's own forward: to precompute, for a live full
        fine-tuning reference, and for a held-out set without a cache (a LoRA run's live training reference comes
        from the fused loss's `ref_hidden` instead)."""
        if self.reference_released:
            raise ValueError("this full fine-tuning run let its reference copy go once the reference log-probs of its "
                             "training and held-out sets were precomputed: give a set to evaluate as eval_dataset "
                             "when the trainer is built, or --precompute_ref_logps false")
        with reference_context(self.model, self.reference_model):
            target = self.reference_model or self.model
            return sequence_logps(target, self.answer_tokens(target, inputs, features))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:  # a training batch: its examples are the training set's
            self.check_layout(inputs, model)
        # Frozen vision tower and projector: one encode per image serves policy and reference.
        features = image_features(model, inputs) if self.args.packing else None
        ref_logps, ref_hidden = inputs.get("ref_logps"), None
        if ref_logps is None and self.reference_model is None:  # LoRA: same LM head, one fused launch
            with reference_context(model, None):
                ref_hidden = self.answer_tokens(model, inputs, features).hidden
        elif ref_logps is None:
            ref_logps = self.reference_logps(inputs, features)
        tokens = self.answer_tokens(model, inputs, features)
        weight, bias = lm_head(model)
        args = self.args
        loss, metrics = fused_linear_mdpo_loss(
            tokens.hidden, weight, tokens.labels, tokens.segment_ids, ref_logps, ref_hidden=ref_hidden, bias=bias,
            num_examples=tokens.num_examples, beta=args.beta, anchor=args.anchor, weights=args.loss_weights,
            softcap=logit_softcap(model), check_ranges=False,  # the collators' ids and labels, in range by construction
        )
        # One host sync per step, so a NaN never reaches the weights; every process stops together.
        bad = (~torch.isfinite(loss.detach())).float()
        if self.args.world_size > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item():
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            here = torch.isfinite(loss)
            where = "the loss is non-finite on another process" if here else f"loss is {loss.item()}"
            raise NonFiniteLossError(
                f"{where} at step {self.state.global_step + 1} (examples {inputs['example_index'].tolist()}); "
                f"stopped before the optimizer step. Last good checkpoint: {last or 'none saved yet'}"
            )
        for name, value in logged_metrics(metrics, args.num_branches):
            self._metrics[name].append(value)
        self.count_batch(inputs["stats"], live_reference="ref_logps" not in inputs)
        return (loss, metrics) if return_outputs else loss

    def count_batch(self, stats: BatchStats, live_reference: bool) -> None:
        """A step's work, logged as `tokens/model` (token positions through the language model, both forwards),
        `tokens/padding_share` and `images/encoded`."""
        forwards = 2 if live_reference else 1
        positions = stats.tokens + stats.padding
        self._metrics["tokens/model"].append(torch.tensor(float(positions * forwards)))
        self._metrics["tokens/padding_share"].append(torch.tensor(stats.padding / positions))
        # packed: each distinct image once per step; padded: every row's image in every forward
        images = stats.images * (1 if self.args.packing else forwards)
        self._metrics["images/encoded"].append(torch.tensor(float(images)))

    def _save_checkpoint(self, model, trial):
        """Trainer writes the checkpoint under a staging name; it becomes `checkpoint-N` in one rename once every
        process is done, so a run killed mid-save leaves no `checkpoint-N` that looks whole but is not, and
        rotation never deletes the last good checkpoint before the next one is complete."""
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"{hf_trainer.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staging = os.path.join(run_dir, f"{STAGING_PREFIX}-{self.state.global_step}")
        if self.args.should_save:
            for stale in glob.glob(os.path.join(run_dir, f"{STAGING_PREFIX}-*")):  # left by a killed save
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        prefix = hf_trainer.PREFIX_CHECKPOINT_DIR
        hf_trainer.PREFIX_CHECKPOINT_DIR = STAGING_PREFIX
        try:
            super()._save_checkpoint(model, trial)
        finally:
            hf_trainer.PREFIX_CHECKPOINT_DIR = prefix
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if os.path.exists(final):  # a checkpoint of this step from an earlier run: replace it whole
                shutil.rmtree(final)
            os.replace(staging, final)
            if self.state.best_model_checkpoint == staging:
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(final, hf_trainer.TRAINER_STATE_NAME))
            # Trainer rotated before this checkpoint existed; rotate again now that it does
            hf_trainer.rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                                          best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:  # training logs: mean since the last log, over every process
            names = sorted(self._metrics)
            means = torch.stack([torch.stack([v.to(self.args.device) for v in self._metrics[k]]).float().mean()
                                 for k in names])
            means = self.accelerator.reduce(means, reduction="mean").tolist()
            for i, name in enumerate(names):
                if name in ("tokens/model", "images/encoded"):  # per-step totals: every process's share
                    means[i] *= self.args.world_size
            logs.update(dict(zip(names, means, strict=True)))
            self._metrics.clear()
        super().log(logs, start_time)
