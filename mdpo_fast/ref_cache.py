"""Reference log-probs computed once before training, kept in the output directory, read back each step
(`MDPOTrainer.precompute_reference` drives it).

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
from typing import NamedTuple

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


class BatchLogps(NamedTuple):
    """A batch's reference log-probs: `indices [b]` (example indices) and `logps [b, 3]`."""

    indices: torch.Tensor
    logps: torch.Tensor


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


def precompute(dataset, order, directory: Path, accelerator, make_loader, logps, desc: str) -> dict[int, torch.Tensor]:
    """The reference log-probs of every example of `dataset`, read from the store in `directory` where present,
    the rest computed in `order` (dataset positions) and stored as they come. `make_loader(positions)` gives the
    batches of the positions this process computes (each process an equal share); `logps(batch)` gives their
    `BatchLogps`. Returns every example's values."""
    rank, world = accelerator.process_index, accelerator.num_processes
    store = RefLogpStore(directory, rank)
    missing = [i for i in order if dataset.examples[i].index not in store.values][rank::world]
    accelerator.wait_for_everyone()  # every process splits the same list before any writes a part
    if store.values:
        logger.info("%s: %d cached, %d to compute", desc, len(store.values), len(missing))
    from tqdm.auto import tqdm

    loader = make_loader(missing)
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not accelerator.is_main_process or len(loader) < 8):
        part = logps(batch)
        store.add(part.indices, part.logps)
    accelerator.wait_for_everyone()
    return RefLogpStore(directory).values if world > 1 else store.values
