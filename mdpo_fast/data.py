"""Records -> validated, tokenized examples -> dataset, with every problem reported before training.

Preparation runs once per configuration: its examples are cached as one Arrow file under
`$MDPO_FAST_CACHE` (default `~/.cache/mdpo_fast/prepared`), keyed by the data files, the processor
(settings, tokenizer, chat template), `max_length` and the preparation code itself, and training reads
them memory-mapped from it (`example_table`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from mdpo_fast.example_table import ExampleTable, TableWriter
from mdpo_fast.examples import PreferenceDataset, build_examples
from mdpo_fast.ops.loss import NUM_BRANCHES
from mdpo_fast.records import DataError, Record, count_rows, hf_dataset, iter_records

logger = logging.getLogger("mdpo_fast")


def prepare_dataset(args, processor, records: list[Record] | None = None, source: str | None = None, family=None,
                    path: str | None = None, split: str | None = None):
    """Validate and tokenize `args.dataset` (or `path`, its `split`; or the given records) into a
    `PreferenceDataset`; `family`: the model's family adapter (its image inputs and prompt format), the generic
    one if None.

    Raises `DataError` listing every bad record, unless `args.skip_bad_records`, which drops and counts them.
    """
    path, split = path or args.dataset, split or args.dataset_split
    source = source or str(path)
    use_chat_template(processor, args.chat_template, family)
    start = time.perf_counter()
    cache = None if records is not None else cache_file(args, processor, path, split)
    hit = cache is not None and cache.exists()
    if hit:
        examples, problems = ExampleTable(cache), []
        n_good, n_truncated = len(examples), examples.n_truncated
    else:
        problems: list[str] = []
        if records is None:
            if path is None:
                raise DataError(["no dataset given: pass --dataset FILE_OR_DIR"])
            # a stream, read a window at a time; images are decoded once, below, by the pass that tokenizes
            total = count_rows(path, split)
            records = iter_records(path, problems, image_root=args.image_root, split=split)
        else:
            total = len(records)
        if args.skip_bad_records:
            records = _without_same_answers(records, problems, source)
        writer = None if cache is None else TableWriter(cache)
        try:
            examples, bad, n_truncated = build_examples(
                records, processor, max_length=args.max_length, source=source, total=total,
                num_proc=args.dataset_num_proc, sink=writer and writer.add,
            )
        except BaseException:
            if writer is not None:
                writer.discard()
            raise
        n_good = len(examples) if writer is None else writer.count
        problems = sorted(problems + bad, key=_record_number) or ([] if n_good else [f"{source}: no records"])
        if writer is not None and problems and not args.skip_bad_records:
            writer.discard()
        elif writer is not None:  # with bad records, not under the cache's name: they are checked again next run
            examples = writer.close(None if not problems else cache.with_suffix(".unchecked.arrow"))
    logger.info("prepared %d records of %s (%d bad) in %.1f s%s", n_good + len(problems), source,
                len(problems), time.perf_counter() - start, f" (cached: {cache})" if hit else "")
    if problems and not args.skip_bad_records:
        raise DataError(problems)
    if problems:
        logger.warning("skipped %d bad records (skip_bad_records):\n  %s", len(problems), "\n  ".join(problems))
    if n_truncated:
        logger.warning("%d examples had an answer truncated to max_length=%d", n_truncated, args.max_length)
    same = examples.n_same_answers if isinstance(examples, ExampleTable) else \
        sum(ex.chosen_text == ex.rejected_text for ex in examples)
    if same:
        logger.warning("%d examples of %s have the same chosen and rejected answer: their DPO term is a constant "
                       "log 2 (--skip_bad_records true skips them)", same, source)
    return PreferenceDataset(
        examples, processor, family, seed=args.corruption_seed, area=args.corruption_area,
        ratio=args.corruption_ratio, corrupted=args.num_branches == NUM_BRANCHES, num_skipped=len(problems),
    )


def _without_same_answers(records, problems: list[str], source: str):
    """The records whose chosen and rejected answers differ; each other one is a problem line (a skipped record)."""
    for record in records:
        if record.chosen.strip() == record.rejected.strip():
            problems.append(f"{source} record {record.index}: the chosen and rejected answers are the same")
            continue
        yield record


def use_chat_template(processor, chat_template: str | None, family=None) -> None:
    """Give the processor `chat_template` (a Jinja string or a file holding one) if set, else keep its own, else
    the family's documented prompt format; with none of them, stop with a message naming --chat_template."""
    if chat_template:
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        processor.chat_template = chat_template
    elif processor.chat_template is None:
        if family is None or family.chat_template is None:
            raise DataError(["the model's processor has no chat template and its family documents none: pass "
                             "--chat_template TEMPLATE_OR_FILE (a Jinja chat template)"])
        processor.chat_template = family.chat_template


# Bump when what preparation produces changes in a way the hashed sources below do not show.
CACHE_VERSION = 2
_CODE = ("examples.py", "example_table.py", "records.py", "data.py", "families/base.py")


def cache_dir() -> Path:
    return Path(os.environ.get("MDPO_FAST_CACHE") or Path.home() / ".cache" / "mdpo_fast") / "prepared"


def cache_file(args, processor, path: str | None = None, split: str | None = None) -> Path | None:
    """Where the prepared examples of the set `path` (default `args.dataset`; its `split`) live under this
    configuration, or None for data without files (records in memory), which are not cached."""
    path, split = path or args.dataset, split or args.dataset_split
    source = _source_identity(path, split)
    if source is None:
        return None
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    here = Path(__file__).parent
    key = json.dumps([
        CACHE_VERSION, source, str(args.image_root), split, args.max_length, args.skip_bad_records,
        processor.to_json_string(), processor.chat_template, backend.to_str() if backend else tokenizer.get_vocab(),
        [hashlib.sha256((here / name).read_bytes()).hexdigest() for name in _CODE],
    ], sort_keys=True, default=str)
    return cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.arrow"


def _source_identity(dataset, split: str) -> list | None:
    """Every file of the dataset (path, size, modification time): a local file or folder, or the Arrow files a hub
    dataset was downloaded into (a new revision is new files). None for data with no files (records in memory)."""
    if dataset is None:
        return None
    if os.path.exists(dataset):
        path = Path(dataset).resolve()
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = [Path(f["filename"]) for f in hf_dataset(str(dataset), split).cache_files]
        if not files:
            return None
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _record_number(problem: str) -> int:
    """Problems in record order (parse problems and image or tokenization problems come from two passes)."""
    head = problem.split(": ", 1)[0]
    number = head.rsplit(" record ", 1)[-1]
    return int(number) if number.isdigit() else -1
