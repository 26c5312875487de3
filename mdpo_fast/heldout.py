"""Held-out examples: a seeded split of a prepared set, and the image swap that measures how much a model's answers
depend on their image (`image/swap_accuracy`, docs/DESIGN.md "Image reliance")."""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from mdpo_fast.examples import Example, PreferenceDataset, blank_image
from mdpo_fast.ops.loss import logged_metrics, mdpo_loss
from mdpo_fast.records import ArrowImage, load_image

logger = logging.getLogger("mdpo_fast")


class ExampleRows(Sequence):
    """The examples at `rows` of a prepared sequence (a list or a memory-mapped `ExampleTable`), as a sequence."""

    def __init__(self, examples: Sequence[Example], rows):
        self.examples, self.rows = examples, np.asarray(rows, dtype=np.int64)
        indices = getattr(examples, "indices", None)
        indices = np.array([ex.index for ex in examples]) if indices is None else indices
        self.indices = indices[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.examples[int(self.rows[i])]


def split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(train rows, held-out rows)` of `n` examples: a seeded `fraction` held out (at least one, never all),
    disjoint, each in ascending order."""
    if not 0 < fraction < 1:
        raise ValueError(f"eval_split must lie in (0, 1), got {fraction}")
    if n < 2:
        raise ValueError(f"eval_split needs at least 2 examples, the set has {n}")
    held = min(n - 1, max(1, round(n * fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(order[held:]), np.sort(order[:held])


class Split(NamedTuple):
    """`train` and `held` (held-out) views of one prepared set."""

    train: PreferenceDataset
    held: PreferenceDataset


def split_dataset(dataset: PreferenceDataset, fraction: float, seed: int) -> Split:
    """The `Split` of a prepared dataset (`split_rows`), with its processor and corruption."""
    train, held = split_rows(len(dataset), fraction, seed)
    return Split(*(dataset.subset(ExampleRows(dataset.examples, rows)) for rows in (train, held)))


def image_key(ref) -> str:
    """A digest of the picture: two references to one picture (a set often asks several questions of one image) have
    one key. The encoded bytes where the reference has them (a file, bytes, an Arrow row: no decode, ~0.1 ms
    against ~10 ms for a 640x480 JPEG), the pixels of an image already in memory."""
    if isinstance(ref, ArrowImage):
        ref = ref.read()
    if isinstance(ref, str | Path):
        ref = Path(ref).read_bytes()
    if isinstance(ref, bytes | bytearray):
        return hashlib.sha1(ref).hexdigest()
    image = load_image(ref)
    return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()


def swap_partners(keys: list[str], seed: int) -> list[int | None]:
    """For each example the one whose image it is shown: a seeded derangement that pairs examples of different
    images where it can. Examples are grouped by image in a seeded order and paired with the one half way round
    the cycle, which lies in another group unless a group holds more than half the examples; such pairs (same
    picture) get None and are left out of the metrics."""
    n = len(keys)
    if n < 2:
        return [None] * n
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i in rng.permutation(n):
        groups.setdefault(keys[i], []).append(int(i))
    cycle = [i for key in rng.permutation(sorted(groups)) for i in groups[key]]
    half = n // 2
    partners: list[int | None] = [None] * n
    for k, i in enumerate(cycle):
        j = cycle[(k + half) % n]
        partners[i] = j if keys[j] != keys[i] else None
    return partners


class SwapDataset(torch.utils.data.Dataset):
    """Each held-out example's chosen answer, its prompt shown another example's image (`swap_partners`): the prompt
    is tokenized again for that image's size, as preparation tokenizes it, and the item carries that image's
    inputs. Items are 1-branch examples (chosen only) with the original example's index."""

    def __init__(self, dataset: PreferenceDataset, seed: int):
        self.dataset = dataset
        partners = swap_partners([image_key(ex.image) for ex in dataset.examples], seed)
        self.pairs = [(i, j) for i, j in enumerate(partners) if j is not None]
        if len(self.pairs) < len(partners):
            logger.warning("image swap: %d of %d held-out examples share their picture with over half the set and "
                           "are left out", len(partners) - len(self.pairs), len(partners))
        self._prompts: dict[int, array] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def _prompt(self, k: int, ex: Example, image) -> array:
        if k not in self._prompts:
            ids = self.dataset.processor(text=ex.prompt_text, images=blank_image(image.size))["input_ids"][0]
            self._prompts[k] = array(ex.prompt_ids.typecode, ids)
        return self._prompts[k]

    def __getitem__(self, k: int) -> dict:
        i, j = self.pairs[k]
        ex, other = self.dataset.examples[i], self.dataset.examples[j]
        image = load_image(other.image)
        swapped = Example(ex.index, other.image, self._prompt(k, ex, image), ex.chosen_ids,
                          array(ex.chosen_ids.typecode), ex.prompt_text, ex.chosen_text)
        data = self.dataset
        return {"example": swapped, "image": data.family.image_inputs(data.processor, image, data.image_prompt)}


class SetLogps(NamedTuple):
    """Summed answer log-probs of a set's examples: `indices [n]` (record indices), `policy` and `reference`
    `[n, 3]` (chosen, rejected, corrupted; zeros for a branch not built)."""

    indices: torch.Tensor
    policy: torch.Tensor
    reference: torch.Tensor


class HeldoutResult(NamedTuple):
    """`metrics` by name and the set's `logps`."""

    metrics: dict[str, float]
    logps: SetLogps


class ReferenceSwap(NamedTuple):
    """A held-out set's image swap (`dataset`, a `SwapDataset`) and the reference's `ref_image/...` metrics."""

    dataset: SwapDataset
    metrics: dict[str, float]


def heldout_metrics(trainer, dataset, policy: bool = True) -> HeldoutResult:
    """Over `dataset`: the loss and every training metric (the imageless ones where that branch is built), and the
    image reliance of the policy (`image/swap_accuracy`, `image/swap_margin`) and of the reference (`ref_image/...`,
    computed once per set), as docs/DESIGN.md ("Image reliance") defines them. Without `policy` the policy is the
    reference (a base model alone)."""
    args = trainer.args
    logps = trainer.branch_logps(dataset, args.num_branches, policy=policy)
    if not policy:
        logps = logps._replace(policy=logps.reference)
    loss, metrics = mdpo_loss(logps.policy, logps.reference, beta=args.beta, anchor=args.anchor,
                              weights=args.loss_weights)
    result = {"loss": loss.item(), **{name: value.item() for name, value in logged_metrics(metrics, args.num_branches)}}
    swap = reference_swap(trainer, dataset, logps)
    if len(swap.dataset):
        if policy:
            swapped = trainer.branch_logps(swap.dataset, 1, reference=False)
            result.update(swap_metrics(logps.indices, logps.policy[:, 0], swapped.indices, swapped.policy[:, 0]))
        else:
            result.update({k[len("ref_"):]: v for k, v in swap.metrics.items()})
        result.update(swap.metrics)
    return HeldoutResult(result, logps)


def reference_swap(trainer, dataset, logps: SetLogps | None = None) -> ReferenceSwap:
    """The `ReferenceSwap` of a held-out set, computed once per trainer and set (the reference never changes);
    `logps`: the set's log-probs if at hand. Call it before a full fine-tuning run lets its reference copy go."""
    if id(dataset) not in trainer.image_swaps:  # the swap dataset holds the set: its id is not reused
        swap = SwapDataset(dataset, trainer.args.seed)
        metrics = {}
        if len(swap):
            if logps is None:
                logps = cached_reference(dataset) or trainer.branch_logps(dataset, 1, policy=False)
            ref = trainer.branch_logps(swap, 1, policy=False)
            metrics = swap_metrics(logps.indices, logps.reference[:, 0], ref.indices, ref.reference[:, 0])
        trainer.image_swaps[id(dataset)] = ReferenceSwap(swap, {f"ref_{k}": v for k, v in metrics.items()})
    return trainer.image_swaps[id(dataset)]


def cached_reference(dataset) -> SetLogps | None:
    """The set's reference log-probs from its precomputed cache, without a pass over its images; None if uncached."""
    if dataset.ref_logps is None:
        return None
    indices = getattr(dataset.examples, "indices", None)
    indices = torch.as_tensor(indices if indices is not None else [ex.index for ex in dataset.examples])
    reference = torch.stack([dataset.ref_logps[int(i)] for i in indices])
    return SetLogps(indices, reference, reference)


def swap_metrics(indices, own, swap_indices, swapped) -> dict[str, float]:
    """`image/swap_accuracy`: the share of examples whose chosen answer is likelier with its own image than with the
    swapped one; `image/swap_margin`: the mean log-prob difference. `own` [n] by example `indices`, `swapped` [k]
    by `swap_indices`."""
    row = {int(i): k for k, i in enumerate(indices.tolist())}
    diff = own[[row[int(i)] for i in swap_indices.tolist()]] - swapped
    return {"image/swap_accuracy": (diff > 0).float().mean().item(), "image/swap_margin": diff.mean().item()}
