"""Layer 2: records into token ids through the model's own processor and chat template, and a dataset
that yields each example's pixel values for the image and its corruption."""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import multiprocessing
import sys
import types
from array import array
from collections.abc import Iterable, Sized
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from mdpo_fast.corruption import AREA, RATIO, check_corruption, corrupt_image
from mdpo_fast.families.base import Family, image_prompt
from mdpo_fast.records import RECORD_ERRORS, DataError, Record, check_image, load_image, problem_line

# Below this many records, preparation runs in this process: starting workers costs seconds.
MIN_PARALLEL = 256
WINDOW = 4096  # records handed to the workers at a time


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
    # The token ids follow from the image's size alone: the processor sees a blank stand-in of that size.
    stand_in = blank_image(check_image(record.image))
    prompt_text = processor.apply_chat_template(list(record.prompt), tokenize=False, add_generation_prompt=True)
    prompt_ids = processor(text=prompt_text, images=stand_in)["input_ids"][0]
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
    texts = [_answer_text(processor, record.prompt, answer, prompt_text) for answer in (record.chosen, record.rejected)]
    ids = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
    truncated = any(len(a) > room for a in ids)
    answers = [array(code, a[:room]) for a in ids]
    return Example(record.index, record.image, array(code, prompt_ids), *answers, prompt_text, *texts), truncated


@functools.lru_cache(maxsize=16)
def blank_image(size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size)


class BuiltExamples(NamedTuple):
    """`examples` (empty when a sink took them), one `problems` line per bad record, and how many records had an
    answer truncated (`n_truncated`)."""

    examples: list[Example]
    problems: list[str]
    n_truncated: int


def build_examples(
    records: Iterable[Record], processor, *, max_length: int, source: str = "data", num_proc: int = 1,
    min_parallel: int = MIN_PARALLEL, sink=None, total: int | None = None,
) -> BuiltExamples:
    """Check every image (`check_image`, the one decode of each) and tokenize every record, over `num_proc` worker
    processes when there are at least `min_parallel` records, with a progress bar (of `total` records if known).
    Problems come in record order whatever the number of processes. `records` may be a stream: it is read a window
    at a time. `sink(example, truncated)` takes each example as it comes instead of the returned list (which is
    then empty), so that a large set is never all in memory as objects."""
    from tqdm.auto import tqdm

    total = len(records) if total is None and isinstance(records, Sized) else total
    examples, problems, n_truncated = [], [], 0
    with tqdm(total=total, desc="preparing records", unit="rec",
              disable=total is not None and total < min_parallel) as bar:
        for record, (example, truncated, problem) in _prepared(records, processor, max_length, num_proc,
                                                               min_parallel):
            bar.update()
            if problem is not None:
                problems.append(f"{source} record {record.index}: {problem}")
                continue
            n_truncated += truncated
            if sink is None:
                examples.append(example)
            else:
                sink(example, truncated)
    return BuiltExamples(examples, problems, n_truncated)


def _prepared(records: Iterable[Record], processor, max_length: int, num_proc: int, min_parallel: int):
    """`(record, (example, truncated, problem))` in record order. Workers get a window of records at a time, the
    next one queued before the current one's results are taken, so they never wait and only two windows of
    records are in memory at once."""
    stream = iter(records)
    window = list(itertools.islice(stream, WINDOW))
    if num_proc > 1 and len(window) >= min_parallel:
        # spawn: a fork of a process whose torch / tokenizer threads hold locks can hang. An executor, not a
        # Pool: a worker that dies is an error here, not a replacement worker started forever.
        with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(processor, max_length)) as pool:

            def submit(part):
                with _main_not_reimported():  # map submits every task, which starts any worker not yet started
                    return pool.map(_prepare, part, chunksize=max(1, min(64, len(part) // (4 * num_proc))))

            results = submit(window)
            while window:
                following = list(itertools.islice(stream, WINDOW))
                queued = submit(following) if following else None
                yield from zip(window, results, strict=True)
                window, results = following, queued
        return
    inner = processor.image_processor
    _init_worker(processor, max_length)
    try:
        for record in itertools.chain(window, stream):
            yield record, _prepare(record)
    finally:  # the caller's processor as it was, and not held here
        processor.image_processor = inner
        _WORKER.clear()


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
    reuse them, with pixel values as zero-memory stand-ins of the same shape: the resize and normalise pipeline runs
    once per image size, on a blank image."""

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


class ExampleImages(NamedTuple):
    image: Image.Image
    corrupted: Image.Image


class PreferenceDataset(torch.utils.data.Dataset):
    """Examples with their images processed on access, the original and (with `corrupted`) the corrupted one,
    through the model family's `image_inputs` (the generic one when `family` is None)."""

    def __init__(self, examples: list[Example], processor, family=None, *, seed: int, area=AREA, ratio=RATIO,
                 corrupted: bool = True, num_skipped: int = 0):
        if not examples:
            raise DataError(["no usable examples"])
        check_corruption(area, ratio)
        self.examples = examples  # a list, or an ExampleTable (memory-mapped)
        indices = getattr(examples, "indices", None)
        indices = np.array([ex.index for ex in examples]) if indices is None else indices
        self._order = np.argsort(indices, kind="stable")
        self._sorted = indices[self._order]
        self.processor = processor
        self.family = family or Family()
        self.image_prompt = image_prompt(processor)
        self.seed, self.area, self.ratio = seed, tuple(area), tuple(ratio)
        self.corrupted = corrupted  # False: items carry no corrupted image (a run that does not use that branch)
        self.num_skipped = num_skipped  # bad records dropped by `skip_bad_records`
        self.ref_logps: dict[int, torch.Tensor] | None = None  # precomputed reference log-probs by record index

    def __len__(self) -> int:
        return len(self.examples)

    def tokens_outside(self, vocab_size: int) -> list[str]:
        """One line per example holding a token id the model has no embedding or logit for. Only a tokenizer
        larger than the model's vocabulary can make one, so the examples are read only then."""
        if len(self.processor.tokenizer) <= vocab_size:
            return []
        return [f"example {ex.index}: token id {top} is outside the model's vocabulary of {vocab_size} (its "
                f"processor's tokenizer has {len(self.processor.tokenizer)} tokens): use the model's own processor, "
                f"or resize its token embeddings to the tokenizer" for ex in self.examples
                if (top := max(max(ids, default=0) for ids in (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids)))
                >= vocab_size]

    def subset(self, examples) -> PreferenceDataset:
        """The same processing (family, corruption, branches) over other examples (`heldout.ExampleRows`)."""
        return PreferenceDataset(examples, self.processor, self.family, seed=self.seed, area=self.area,
                                 ratio=self.ratio, corrupted=self.corrupted)

    def row_of(self, index: int) -> int:
        """The dataset row of the example with record index `index`."""
        at = int(np.searchsorted(self._sorted, index))
        if at == len(self._sorted) or self._sorted[at] != index:
            raise KeyError(index)
        return int(self._order[at])

    def images(self, i: int) -> ExampleImages:
        """The example's image and its corruption, as PIL images."""
        ex = self.examples[i]
        image = load_image(ex.image)
        return ExampleImages(image, corrupt_image(image, self.seed, ex.index, self.area, self.ratio))

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        image = load_image(ex.image)
        # One processor call per image, so batches can concatenate them in any order, whatever the family.
        item = {"example": ex, "image": self.family.image_inputs(self.processor, image, self.image_prompt)}
        if self.corrupted:
            corrupted = corrupt_image(image, self.seed, ex.index, self.area, self.ratio)
            item["corrupted_image"] = self.family.image_inputs(self.processor, corrupted, self.image_prompt)
        if self.ref_logps is not None:
            item["ref_logps"] = self.ref_logps[ex.index]
        return item
