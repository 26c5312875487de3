"""Which examples make up each step: length-grouped with a seeded shuffle, the same whatever the layout."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Indices in step order: consecutive runs of `batch_size` are the steps.

    The seeded permutation is cut into mega-batches of `batch_size * GROUP` examples, each sorted by
    length and cut into steps, so a step holds examples of similar length (little tail padding, even
    token counts); the steps are then shuffled. A pure function of (seed, epoch): resuming, or switching
    packing off, gives the same steps.
    """

    GROUP = 16  # steps per mega-batch: wide enough to find similar lengths, narrow enough to stay random

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.GROUP
        steps = []
        for start in range(0, len(order), size):
            mega = sorted(order[start : start + size], key=lambda i: -self.lengths[i])
            steps += [mega[k : k + self.batch_size] for k in range(0, len(mega), self.batch_size)]
        # the last, possibly short, step stays last so every other step is full
        full, tail = (steps[:-1], steps[-1:]) if len(order) % self.batch_size else (steps, [])
        shuffled = [full[i] for i in torch.randperm(len(full), generator=g).tolist()] + tail
        return iter([i for step in shuffled for i in step])
