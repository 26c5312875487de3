"""Layer 2: records into token ids through the model's own processor and chat template, and a dataset
that yields each example's pixel values for the image and its corruption."""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import sys
import types
from array import array
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mdpo_fast.corruption import AREA, RATIO, corrupt_image
from mdpo_fast.families.base import Family, image_prompt
from mdpo_fast.records import RECORD_ERRORS, DataError, Record, load_image, problem_line

# Below this many records, preparation runs in this process: starting workers costs seconds.
MIN_PARALLEL = 256


@dataclass(frozen=True)
class Example:
    """One tokenized record. Token ids are arrays of 2 bytes a token (4 for vocabularies over 65536), not Python
    ints of 28, so 83k examples with 576 image tokens each stay a few hundred MiB; the image is a reference, read
    when a loader needs it."""

    index: int  # the record's index in its source
    image: Any
    prompt_ids: array  # chat-templated prompt, image tokens expanded
    chosen_ids: array  # answer tokens, end-of-turn included
    rejected_ids: array
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
    code = "H" if len(processor.tokenizer) <= 1 << 16 else "i"  # 2 bytes a token where the vocabulary allows
    answers, texts, truncated = [], [], False
    for answer in (record.chosen, record.rejected):
        text = _answer_text(processor, record.prompt, answer, prompt_text)
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        truncated |= len(ids) > room
        answers.append(array(code, ids[:room]))
        texts.append(text)
    return Example(record.index, record.image, array(code, prompt_ids), *answers, prompt_text, *texts), truncated


def build_examples(
    records: list[Record], processor, *, max_length: int, source: str = "data", num_proc: int = 1,
    min_parallel: int = MIN_PARALLEL,
) -> tuple[list[Example], list[str], int]:
    """Decode (the one full check of each image) and tokenize every record, over `num_proc` worker processes when
    there are at least `min_parallel` records, with a progress bar. Returns `(examples, problems, n_truncated)`,
    one problem line per bad record, in record order whatever the number of processes."""
    from tqdm.auto import tqdm

    results = []
    bar = tqdm(total=len(records), desc="preparing records", unit="rec", disable=len(records) < min_parallel)
    if num_proc > 1 and len(records) >= min_parallel:
        chunk = max(1, min(64, len(records) // (4 * num_proc)))
        # spawn: a fork of a process whose torch / tokenizer threads hold locks can hang. An executor, not a
        # Pool: a worker that dies is an error here, not a replacement worker started forever.
        with _main_not_reimported(), ProcessPoolExecutor(
            num_proc, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
            initargs=(processor, max_length),
        ) as pool:
            for result in pool.map(_prepare, records, chunksize=chunk):
                results.append(result)
                bar.update()
    else:
        inner = processor.image_processor
        _init_worker(processor, max_length)
        try:
            for record in records:
                results.append(_prepare(record))
                bar.update()
        finally:  # the caller's processor as it was, and not held here
            processor.image_processor = inner
            _WORKER.clear()
    bar.close()
    examples, problems, n_truncated = [], [], 0
    for record, (example, truncated, problem) in zip(records, results, strict=True):
        if problem is not None:
            problems.append(f"{source} record {record.index}: {problem}")
            continue
        examples.append(example)
        n_truncated += truncated
    return examples, problems, n_truncated


_WORKER: dict = {}


@contextlib.contextmanager
def _main_not_reimported():
    """Spawned workers re-run the caller's main script unless it is hidden from them; they need nothing from it,
    and a script without an `if __name__ == "__main__"` guard would otherwise prepare again in every worker."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _init_worker(processor, max_length: int) -> None:
    processor.image_processor = SameSizeOutputs(processor.image_processor)
    _WORKER.update(processor=processor, max_length=max_length)


class SameSizeOutputs:
    """An image processor that runs once per image size and mode: tokenizing a prompt reads only the shapes,
    sizes and grids of its output (they follow from the image's size alone), so later images of a seen size
    reuse them, with pixel values as zero-memory stand-ins of the same shape. The one decode per record that
    checks the image still happens; the resize and normalise pipeline runs only for new sizes."""

    def __init__(self, inner):
        self.inner = inner
        self.outputs: dict = {}

    def __call__(self, images, *args, **kwargs):
        key = (_sizes(images), repr(args), repr(sorted(kwargs.items())))
        if key not in self.outputs:
            out = self.inner(images, *args, **kwargs)
            for name, value in out.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    out[name] = value.new_zeros(()).expand(value.shape)
                elif isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
                    out[name] = np.broadcast_to(np.zeros((), value.dtype), value.shape)
            self.outputs[key] = out
        return copy.copy(self.outputs[key])  # processors pop entries from it (Idefics3: rows, cols)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _sizes(images):
    """(size, mode) of every image in a possibly nested list, as a hashable key."""
    if isinstance(images, (list, tuple)):
        return tuple(_sizes(im) for im in images)
    return images.size, images.mode


def _prepare(record: Record):
    """`(example, truncated, None)` or `(None, False, problem)` for one record, in a worker."""
    try:
        return (*tokenize_record(record, _WORKER["processor"], _WORKER["max_length"]), None)
    except RECORD_ERRORS as e:  # one bad record is one problem line, never a dead worker
        return None, False, problem_line(e)


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
