"""Tokens through the language model per example: the published mDPO step vs mdpo-fast's layouts.

    python -m benchmarks.token_counts

A deterministic count (no model): a synthetic length mix like LLaVA-1.5 on RLAIF-V (576 image tokens,
prompts of 20-80 text tokens, answers of 30-300), batches of 8, the paper's 3 epochs. The published
step pads chosen and rejected into one forward and the corrupted branch into another, in random
batches, twice (policy and reference). mdpo-fast's counts come from its own sampler and collator,
tail padding included; a precomputed reference costs one pass over the data in all.
"""

from __future__ import annotations

import random

import torch

from mdpo_fast.examples import Example
from mdpo_fast.packing import PackedCollator, packed_length
from mdpo_fast.sampler import LengthGroupedSampler

IMAGE_TOKENS, IMG = 576, 7


def synthetic_examples(n: int = 2000, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        prompt = (1,) * 5 + (IMG,) * IMAGE_TOKENS + (1,) * rng.randint(20, 80)
        examples.append(Example(i, None, prompt, (2,) * rng.randint(30, 300), (3,) * rng.randint(30, 300)))
    return examples


def published_tokens(examples, batch_size: int, seed: int) -> int:
    """One epoch of the published step: random batches; [chosen; rejected] padded together, corrupted alone;
    the same two forwards again for the reference."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    total = 0
    for start in range(0, len(order), batch_size):
        batch = [examples[i] for i in order[start : start + batch_size]]
        pair = max(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in batch)
        corrupted = max(len(e.prompt_ids) + len(e.chosen_ids) for e in batch)
        total += 2 * (2 * len(batch) * pair + len(batch) * corrupted)
    return total


def packed_tokens(examples, batch_size: int, seed: int, max_tokens: int, prefix_sharing: bool, order=None) -> int:
    """One pass of mdpo-fast's layout: rows x width of every step (tail padding counted)."""
    # LLaVA-1.5-7B: 4096 wide, rows as SDPA's dense masks make them
    collate = PackedCollator(0, IMG, max_tokens, prefix_sharing, dense_hidden_size=4096)
    dummy = {"pixel_values": torch.zeros(1, 1)}
    if order is None:
        lengths = [packed_length(e, prefix_sharing) for e in examples]
        order = list(LengthGroupedSampler(lengths, batch_size, seed))
    total = 0
    for start in range(0, len(order), batch_size):
        items = [{"example": examples[i], "image": dummy, "corrupted_image": dummy}
                 for i in order[start : start + batch_size]]
        total += collate(items)["input_ids"].numel()
    return total


def token_counts(n: int = 2000, batch_size: int = 8, epochs: int = 3, max_tokens: int = 8192, seed: int = 0):
    examples = synthetic_examples(n, seed)
    published = sum(published_tokens(examples, batch_size, seed + e) for e in range(epochs))
    policy = sum(packed_tokens(examples, batch_size, seed + e, max_tokens, True) for e in range(epochs))
    precompute = packed_tokens(examples, batch_size, seed, max_tokens, True, order=list(range(n)))
    no_sharing = sum(packed_tokens(examples, batch_size, seed + e, max_tokens, False) for e in range(epochs))
    per_example = {
        "published": published / n,
        "default (packed, shared prefix, precomputed reference)": (policy + precompute) / n,
        "packed, shared prefix, live reference": 2 * policy / n,
        "packed, no sharing, live reference": 2 * no_sharing / n,
    }
    return {name: {"tokens_per_example": v, "ratio": v / per_example["published"]} for name, v in per_example.items()}


def main() -> None:
    from pathlib import Path

    from benchmarks.record import result_row, write_result

    rows = token_counts()
    for name, row in rows.items():
        print(f"{row['tokens_per_example']:9.0f} tokens/example  {row['ratio']:.3f}x  {name}")
    shape = {"examples": 2000, "batch": 8, "epochs": 3, "image_tokens": IMAGE_TOKENS}
    write_result(Path(__file__).parent / "results" / "token_counts.jsonl",
                 result_row("token_counts", device="cpu", dtype="-", shape=shape, rows=rows))


if __name__ == "__main__":
    main()
