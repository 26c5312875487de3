"""Records -> validated, tokenized examples -> dataset, with every problem reported before training.

Preparation runs once per configuration: its result (examples, problems) is cached under
`$MDPO_FAST_CACHE` (default `~/.cache/mdpo_fast/prepared`), keyed by the data files, the processor
(settings, tokenizer, chat template), `max_length` and the preparation code itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import time
from pathlib import Path

from mdpo_fast.examples import PreferenceDataset, build_examples
from mdpo_fast.records import DataError, Record, load_records

logger = logging.getLogger("mdpo_fast")


def prepare_dataset(args, processor, records: list[Record] | None = None, source: str | None = None, family=None):
    """Validate and tokenize `args.dataset` (or the given records) into a `PreferenceDataset`; `family`: the model's
    family adapter (its image inputs and prompt format), the generic one if None.

    Raises `DataError` listing every bad record, unless `args.skip_bad_records`, which drops and counts them.
    """
    source = source or str(args.dataset)
    use_chat_template(processor, getattr(args, "chat_template", None), family)
    start = time.perf_counter()
    cache = None if records is not None else cache_file(args, processor)
    hit = cache is not None and cache.exists()
    if hit:
        with cache.open("rb") as f:
            examples, problems, n_truncated = pickle.load(f)
    else:
        problems: list[str] = []
        if records is None:
            if args.dataset is None:
                raise DataError(["no dataset given: pass --dataset FILE_OR_DIR"])
            # images are decoded once, below, by the same pass that tokenizes
            records, problems = load_records(args.dataset, image_root=args.image_root, split=args.dataset_split,
                                             check_images=False)
        examples, bad, n_truncated = build_examples(
            records, processor, max_length=args.max_length, source=source,
            num_proc=getattr(args, "dataset_num_proc", None) or 1,
        )
        problems = sorted(problems + bad, key=_record_number)
        if cache is not None and not problems:  # bad records are fixed in place: check them again next run
            _write_atomically(cache, (examples, problems, n_truncated))
    logger.info("prepared %d records of %s (%d bad) in %.1f s%s", len(examples) + len(problems), source,
                len(problems), time.perf_counter() - start, f" (cached: {cache})" if hit else "")
    if problems and not args.skip_bad_records:
        raise DataError(problems)
    if problems:
        logger.warning("skipped %d bad records (skip_bad_records):\n  %s", len(problems), "\n  ".join(problems))
    if n_truncated:
        logger.warning("%d examples had an answer truncated to max_length=%d", n_truncated, args.max_length)
    dataset = PreferenceDataset(
        examples, processor, family, seed=args.corruption_seed,
        area=args.corruption_area, ratio=args.corruption_ratio,
    )
    dataset.num_skipped = len(problems)
    return dataset


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
CACHE_VERSION = 1
_CODE = ("examples.py", "records.py", "data.py", "families/base.py")


def cache_dir() -> Path:
    return Path(os.environ.get("MDPO_FAST_CACHE") or Path.home() / ".cache" / "mdpo_fast") / "prepared"


def cache_file(args, processor) -> Path | None:
    """Where the prepared examples of this configuration live, or None for data without a stable identity (records
    in memory, hub ids, which are not cached)."""
    source = _source_identity(args.dataset)
    if source is None:
        return None
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    here = Path(__file__).parent
    key = json.dumps([
        CACHE_VERSION, source, str(args.image_root), args.dataset_split, args.max_length,
        processor.to_json_string(), processor.chat_template, backend.to_str() if backend else tokenizer.get_vocab(),
        [hashlib.sha256((here / name).read_bytes()).hexdigest() for name in _CODE],
    ], sort_keys=True, default=str)
    return cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pkl"


def _source_identity(dataset) -> list | None:
    """Every file of a local dataset (path, size, modification time); None for anything else."""
    if dataset is None or not os.path.exists(dataset):
        return None
    path = Path(dataset).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _write_atomically(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)  # a killed run leaves no half-written cache


def _record_number(problem: str) -> int:
    """Problems in record order (parse problems and image or tokenization problems come from two passes)."""
    head = problem.split(": ", 1)[0]
    number = head.rsplit(" record ", 1)[-1]
    return int(number) if number.isdigit() else -1
