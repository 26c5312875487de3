"""Where a training step's time goes, by phase, from torch.profiler.

`label(trainer)` wraps the trainer's phases in `record_function` ranges: data (the next batch, and its
collation when the loader runs in this process), vision (the model's `get_image_features`), language model
(the decoder's forward), loss (the rest of `compute_loss`: masks, LM head, fused loss, layout), backward
and optimizer. `breakdown(prof, steps)` gives each phase's time per step: every profiled op's own time
goes to the innermost range around it, attention kernels (forward and backward) to `attention`, and
what the autograd engine runs to `backward`. Times are self CPU time on the CPU and self device time on
a GPU.
"""

from __future__ import annotations

import functools

import torch

PHASES = ("data", "vision", "language model", "attention", "loss", "backward", "optimizer", "other")
_ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "flex_attention")


class _Range:
    """A `record_function` range entered in one hook and left in another."""

    def __init__(self, name: str):
        self.name, self.open = name, []

    def enter(self, *_, **__):
        rf = torch.profiler.record_function(self.name)
        rf.__enter__()
        self.open.append(rf)

    def exit(self, *_, **__):
        self.open.pop().__exit__(None, None, None)


def _wrapped(fn, name: str):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    return inner


def label(trainer) -> None:
    from transformers import TrainerCallback

    from mdpo_fast.families import family_for
    from mdpo_fast.modeling import unwrap

    model = unwrap(trainer.model)
    backbone = model.model
    backbone.get_image_features = _wrapped(backbone.get_image_features, "vision")
    decoder = _Range("language model")
    language_model = getattr(backbone, family_for(model.config).language_model)
    language_model.register_forward_pre_hook(decoder.enter)
    language_model.register_forward_hook(decoder.exit)
    trainer.compute_loss = _wrapped(trainer.compute_loss, "loss")
    trainer.accelerator.backward = _wrapped(trainer.accelerator.backward, "backward")
    trainer.get_batch_samples = _wrapped(trainer.get_batch_samples, "data")
    optimizer = _Range("optimizer")

    class Optimizer(TrainerCallback):
        def on_pre_optimizer_step(self, *_, **__):
            optimizer.enter()

        def on_optimizer_step(self, *_, **__):
            optimizer.exit()

    trainer.add_callback(Optimizer())


def _phase(event) -> str:
    if any(key in event.name for key in _ATTENTION):
        return "attention"
    node = event
    while node is not None:
        if node.name in PHASES:
            return node.name
        if node.name.startswith("autograd::engine"):
            return "backward"
        node = node.cpu_parent
    return "other"


def breakdown(prof, steps: int, device: str = "cpu") -> dict[str, float]:
    """Milliseconds per step by phase (see the module's docstring)."""
    totals = dict.fromkeys(PHASES, 0.0)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # kernels count through the op that launched them (self device time)
        own = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        totals[_phase(event)] += own / 1e3 / steps
    return totals
