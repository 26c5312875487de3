"""Layer 2: records into token ids through the model's own processor and chat template, and a dataset
that yields each example's pixel values for the image and its corruption."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mdpo_fast.corruption import AREA, RATIO, corrupt_image
from mdpo_fast.families.base import Family, image_prompt
from mdpo_fast.records import DataError, Record, load_image


@dataclass(frozen=True)
class Example:
    index: int  # the record's index in its source
    image: Any
    prompt_ids: tuple[int, ...]  # chat-templated prompt, image tokens expanded
    chosen_ids: tuple[int, ...]  # answer tokens, end-of-turn included
    rejected_ids: tuple[int, ...]
    # the chat-templated texts the ids came from, for the run-time check against the model's plain forward
    prompt_text: str = ""
    chosen_text: str = ""
    rejected_text: str = ""


def _answer_text(processor, prompt_messages, answer: str, prompt_text: str) -> str:
    """The template's rendering of the answer turn: everything the full chat adds after the prompt."""
    full = processor.apply_chat_template(
        list(prompt_messages) + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
        tokenize=False,
    )
    if not full.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt differently once an answer follows it")
    return full[len(prompt_text):]


def tokenize_record(record: Record, processor, max_length: int) -> tuple[Example, bool]:
    """Returns the example and whether an answer was truncated to fit `max_length`."""
    image = load_image(record.image)
    prompt_text = processor.apply_chat_template(list(record.prompt), tokenize=False, add_generation_prompt=True)
    prompt_ids = processor(text=prompt_text, images=image, return_tensors="pt")["input_ids"][0].tolist()
    image_token_id = getattr(processor, "image_token_id", None)
    n_image = sum(t == image_token_id for t in prompt_ids)
    if image_token_id is not None and n_image == 0:
        raise ValueError("the chat template dropped the image placeholder from the prompt")
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"prompt takes {len(prompt_ids)} tokens ({n_image} of them image tokens), leaving no room for the "
            f"answer within max_length={max_length}; truncating would cut the image tokens, raise max_length"
        )
    answers, texts, truncated = [], [], False
    for answer in (record.chosen, record.rejected):
        text = _answer_text(processor, record.prompt, answer, prompt_text)
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        truncated |= len(ids) > room
        answers.append(tuple(ids[:room]))
        texts.append(text)
    return Example(record.index, record.image, tuple(prompt_ids), *answers, prompt_text, *texts), truncated


def build_examples(
    records: list[Record], processor, *, max_length: int, source: str = "data"
) -> tuple[list[Example], list[str], int]:
    """Tokenize every record. Returns `(examples, problems, n_truncated)`, one problem line per bad record."""
    examples, problems, n_truncated = [], [], 0
    for record in records:
        try:
            example, truncated = tokenize_record(record, processor, max_length)
        except (ValueError, OSError) as e:
            problems.append(f"{source} record {record.index}: {e}")
            continue
        examples.append(example)
        n_truncated += truncated
    return examples, problems, n_truncated


class PreferenceDataset(torch.utils.data.Dataset):
    """Examples with their images processed on access, the original and the corrupted one, through the model
    family's `image_inputs` (the generic one when `family` is None)."""

    def __init__(self, examples: list[Example], processor, family=None, *, seed: int, area=AREA, ratio=RATIO):
        if not examples:
            raise DataError(["no usable examples"])
        self.examples = examples
        self._rows = {ex.index: i for i, ex in enumerate(examples)}
        self.processor = processor
        self.family = family or Family()
        self.image_prompt = image_prompt(processor)
        self.seed, self.area, self.ratio = seed, tuple(area), tuple(ratio)
        self.ref_logps: dict[int, torch.Tensor] | None = None  # precomputed reference log-probs by record index

    def __len__(self) -> int:
        return len(self.examples)

    def row_of(self, index: int) -> int:
        """The dataset row of the example with record index `index`."""
        return self._rows[index]

    def images(self, i: int):
        """The example's image and its corruption, as PIL images."""
        ex = self.examples[i]
        image = load_image(ex.image)
        return image, corrupt_image(image, self.seed, ex.index, self.area, self.ratio)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        image, corrupted = self.images(i)
        # One processor call per image, so batches can concatenate them in any order, whatever the family.
        item = {
            "example": ex,
            "image": self.family.image_inputs(self.processor, image, self.image_prompt),
            "corrupted_image": self.family.image_inputs(self.processor, corrupted, self.image_prompt),
        }
        if self.ref_logps is not None:
            item["ref_logps"] = self.ref_logps[ex.index]
        return item
