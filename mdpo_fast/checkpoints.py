"""Where a run writes and what it resumes from, checked before any data or weights load: an output folder that
cannot be written is refused at once, and a checkpoint is used only whole (never a silent partial resume)."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

logger = logging.getLogger("mdpo_fast")

_STEP = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, or no checkpoint where one was asked for."""


def check_output_dir(path: str) -> None:
    """Prove that the run can write into `path` (created later, by the run, if it does not exist yet); a ValueError
    naming it otherwise."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output_dir {path} is a file, not a folder")
    if not folder.exists():  # the nearest folder above it must let us create it
        above = next(p for p in folder.absolute().parents if p.exists())
        if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
            raise ValueError(f"--output_dir {path} cannot be created: {above} is not a writable folder")
        return
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"--output_dir {path} is not writable ({e.strerror or e})") from None


def checkpoint_problem(folder: Path) -> str | None:
    """What keeps `folder` from being a whole Trainer checkpoint (state, weights, optimizer, scheduler, RNG), or
    None. Weights in safetensors files are opened, so a truncated file is found here."""
    if not folder.is_dir():
        return "no such folder"
    names = {p.name for p in folder.iterdir()}
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (OSError, ValueError) as e:
        return f"trainer_state.json cannot be read ({e})"
    sharded = any(n.startswith(("global_step", "pytorch_model_fsdp", "optimizer_0")) for n in names)  # DeepSpeed, FSDP
    weights = sorted(n for n in names if n.endswith((".safetensors", ".bin"))
                     and n.startswith(("adapter_model", "model", "pytorch_model")))
    if not weights and not sharded:
        return "no model or adapter weights"
    from safetensors import SafetensorError, safe_open

    for name in weights:
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(folder / name), "pt"):
                    pass
            except (SafetensorError, OSError) as e:
                return f"{name} cannot be read ({e})"
    if not sharded and "optimizer.pt" not in names:
        return "optimizer.pt is missing"
    if not sharded and "scheduler.pt" not in names:
        return "scheduler.pt is missing"
    if not any(n.startswith("rng_state") for n in names):
        return "its random-number state (rng_state*.pth) is missing"
    return None


def resume_checkpoint(value, output_dir: str) -> str | None:
    """The checkpoint to resume from: None for no resume; `True` / "latest": the newest whole checkpoint in
    `output_dir` (saying which incomplete ones it passed over); a path: that checkpoint, if whole."""
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if value is True or str(value).lower() in ("true", "latest"):
        found = sorted((int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
                       if (m := _STEP.match(p.name)))
        for _, folder in reversed(found):
            problem = checkpoint_problem(folder)
            if problem is None:
                logger.info("resuming from %s", folder)
                return str(folder)
            logger.warning("not resuming from %s: %s", folder, problem)
        what = "no whole checkpoint" if found else "no checkpoint"
        raise CheckpointError(f"--resume_from_checkpoint {value}: {what} in {output_dir}")
    problem = checkpoint_problem(Path(value))
    if problem is not None:
        raise CheckpointError(f"checkpoint {value} cannot be resumed from: {problem}")
    return str(value)
