"""Reference log-probs computed once before training, kept in the output directory, read back each step.

Possible because the corrupted image is a pure function of (seed, example index): each example's
three reference sums never change. Parts are written atomically as they are computed, so an
interrupted pass resumes where it stopped; a fingerprint of everything the numbers depend on keeps a
changed run from reading stale values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("mdpo_fast")


def fingerprint(args, examples) -> str:
    h = hashlib.sha256()
    settings = [args.model_name_or_path, args.model_dtype, args.corruption_seed, list(args.corruption_area),
                list(args.corruption_ratio), args.attn_implementation]
    if args.model_name_or_path is None:  # a model built in code (the demo): its weights follow the seed
        settings.append(args.seed)
    if args.num_branches < 3:  # the corrupted-image column was not computed (3-branch keys are as they were)
        settings.append(f"branches={args.num_branches}")
    h.update(json.dumps(settings, default=str).encode())
    for ex in examples:
        h.update(json.dumps([ex.index, len(ex.prompt_ids), len(ex.chosen_ids)]).encode())
        for ids in (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids):
            h.update(bytes(ids))
    return h.hexdigest()[:16]


class RefLogpStore:
    """`{example index: [3] fp32}` backed by `part-*.pt` files in `directory`."""

    def __init__(self, directory: Path, process_index: int = 0):
        self.directory, self.process_index = directory, process_index
        self.values: dict[int, torch.Tensor] = {}
        for part in sorted(directory.glob("part-*.pt")):
            data = torch.load(part, map_location="cpu")
            self.values.update(zip(data["index"].tolist(), data["logps"].unbind(), strict=True))

    def add(self, indices: torch.Tensor, logps: torch.Tensor) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # Named by process, so processes (and nodes on shared storage) never write the same file.
        mine = len(list(self.directory.glob(f"part-{self.process_index:05d}-*.pt")))
        part = self.directory / f"part-{self.process_index:05d}-{mine:06d}.pt"
        tmp = part.with_suffix(".tmp")
        torch.save({"index": indices.cpu(), "logps": logps.detach().float().cpu()}, tmp)
        os.replace(tmp, part)  # a killed run leaves a whole part or none
        self.values.update(zip(indices.tolist(), logps.detach().float().cpu().unbind(), strict=True))


def precompute_ref_logps(trainer, dataset=None) -> dict[int, torch.Tensor]:
    """Fill the store for every example of `dataset` (default: the training set) missing from it; returns all
    values.

    With several processes each computes an equal share, then all read the whole store.
    """
    args = trainer.args
    training = dataset is None
    dataset = trainer.train_dataset if training else dataset
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise ValueError("precompute_ref_logps runs before DeepSpeed / FSDP place the model: use "
                         "--precompute_ref_logps false there (the reference is then computed each step)")
    trainer.check_layout()  # nothing is cached from a layout that disagrees with the model's own forward
    directory = Path(args.output_dir) / "ref_logps" / fingerprint(args, dataset.examples)
    store = RefLogpStore(directory, args.process_index)
    # In the first epoch's step order (a held-out set: in evaluation's order and batches): with one process the
    # reference sees the same rows as the policy will, so at step 1 (policy == reference) the rewards are exact
    # zeros, as with a live reference.
    order = list(trainer._get_train_sampler()) if training else range(len(dataset))
    missing = [i for i in order if dataset.examples[i].index not in store.values][args.process_index::args.world_size]
    trainer.accelerator.wait_for_everyone()  # every process splits the same list before any writes a part
    if store.values:
        logger.info("reference log-probs: %d cached, %d to compute", len(store.values), len(missing))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, missing),
        batch_size=args.per_device_train_batch_size if training else args.per_device_eval_batch_size,
        collate_fn=trainer.data_collator, num_workers=args.dataloader_num_workers,
    )
    from tqdm.auto import tqdm

    for batch in tqdm(loader, desc="reference log-probs" + ("" if training else " (held out)"), unit="batch",
                      disable=not trainer.is_world_process_zero() or len(loader) < 8):
        batch = trainer._prepare_inputs(batch)
        store.add(batch["example_index"], trainer.reference_logps(batch))
    trainer.accelerator.wait_for_everyone()
    return RefLogpStore(directory).values if args.world_size > 1 else store.values
