"""A LoRA run's adapters merged into its base weights: a standard transformers checkpoint, with its processor,
that `AutoModelForImageTextToText.from_pretrained` loads and serving stacks take as it is."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger("mdpo_fast")


def export_merged(checkpoint: str, out_dir: str, base: str | None = None, dtype: str = "auto") -> Path:
    """Merge the adapters of `checkpoint` (a run's output folder or one of its `checkpoint-N`) into the base model
    (`base`, else the one the adapters name) and write model and processor to `out_dir`, which must be new or
    empty: nothing a user has is overwritten."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mdpo_fast.families import family_for
    from mdpo_fast.modeling import DTYPES
    from mdpo_fast.processors import load_processor, processor_home

    source, out = Path(checkpoint), Path(out_dir)
    adapter_config = source / "adapter_config.json"
    if not adapter_config.is_file():
        raise ValueError(f"{checkpoint} holds no LoRA adapters (adapter_config.json): a full fine-tuning run's "
                         "checkpoint is already a whole model")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out_dir} exists and is not an empty folder: export writes into a new one")
    base = base or json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{checkpoint} does not name its base model: pass --model_name_or_path")
    if dtype not in DTYPES:
        raise ValueError(f"--model_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    family = family_for(AutoConfig.from_pretrained(base))
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=DTYPES[dtype])
    merged = PeftModel.from_pretrained(model, str(source)).merge_and_unload()
    processor = load_processor(processor_home(checkpoint, base), family)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("merged %s into %s: %s", source, base, out)
    return out
