"""Records -> validated, tokenized examples -> dataset, with every problem reported before training."""

from __future__ import annotations

import logging
import os

from mdpo_fast.examples import PreferenceDataset, build_examples
from mdpo_fast.records import DataError, Record, load_records

logger = logging.getLogger("mdpo_fast")


def prepare_dataset(args, processor, records: list[Record] | None = None, source: str | None = None, family=None):
    """Validate and tokenize `args.dataset` (or the given records) into a `PreferenceDataset`; `family`: the model's
    family adapter (its image inputs and prompt format), the generic one if None.

    Raises `DataError` listing every bad record, unless `args.skip_bad_records`, which drops and counts them.
    """
    source = source or str(args.dataset)
    problems: list[str] = []
    if records is None:
        if args.dataset is None:
            raise DataError(["no dataset given: pass --dataset FILE_OR_DIR"])
        records, problems = load_records(args.dataset, image_root=args.image_root, split=args.dataset_split)
    use_chat_template(processor, getattr(args, "chat_template", None), family)
    examples, bad, n_truncated = build_examples(records, processor, max_length=args.max_length, source=source)
    problems += bad
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
