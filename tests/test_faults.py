"""Faults: a NaN stops the run before it reaches the weights; a save killed half-way leaves no checkpoint."""

import os

import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from mdpo_fast.cli import parse_config, run_training
from mdpo_fast.demo_data import demo_records
from mdpo_fast.tiny import build_tiny_model
from mdpo_fast.trainer import MDPOTrainer, NonFiniteLossError

FAST = {"lora_r": 4, "lora_alpha": 8, "max_length": 128, "report_to": "none", "disable_tqdm": True, "use_cpu": True,
        "per_device_train_batch_size": 4, "learning_rate": 1e-3, "save_steps": 2, "logging_steps": 1}


def _args(tmp_path, **overrides):
    return parse_config([], {**FAST, "output_dir": str(tmp_path / "out"), **overrides})


class PoisonAt(TrainerCallback):
    """Turns the LM head to NaN at the start of one step, as a diverging run would."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                model.get_output_embeddings().weight.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(MDPOTrainer, "__init__", _with_callback(MDPOTrainer.__init__, PoisonAt(3)))
    model, processor = build_tiny_model()
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 \(examples \[.*\]\); stopped before"):
        run_training(_args(tmp_path, max_steps=6), model, processor, demo_records(n=24), source="demo")
    out = tmp_path / "out"
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert not (out / "checkpoint-4").exists()
    from safetensors.torch import load_file

    weights = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def _with_callback(init, callback):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(callback)
    return wrapped


def test_save_killed_half_way_leaves_no_checkpoint(tmp_path, monkeypatch):
    real = MDPOTrainer._save_optimizer_and_scheduler
    calls = []

    def die_on_second_save(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:  # model files of checkpoint 4 are written, the optimizer never is
            raise KeyboardInterrupt
        real(self, output_dir)

    monkeypatch.setattr(MDPOTrainer, "_save_optimizer_and_scheduler", die_on_second_save)
    model, processor = build_tiny_model()
    records = demo_records(n=24)
    with pytest.raises(KeyboardInterrupt):
        run_training(_args(tmp_path, max_steps=6, save_total_limit=1), model, processor, records, source="demo")
    out = tmp_path / "out"
    assert not (out / "checkpoint-4").exists()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert {"optimizer.pt", "trainer_state.json", "adapter_model.safetensors"} <= set(os.listdir(out / "checkpoint-2"))

    monkeypatch.setattr(MDPOTrainer, "_save_optimizer_and_scheduler", real)
    model, processor = build_tiny_model()
    trainer = run_training(_args(tmp_path, max_steps=6, save_total_limit=1, resume_from_checkpoint="latest"),
                           model, processor, records, source="demo")
    assert trainer.state.global_step == 6
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", "staging"))) == ["checkpoint-6"]


def test_cli_reports_a_nan_loss_in_one_line(tmp_path, tiny_dir, demo_dir, monkeypatch, capsys):
    from mdpo_fast import cli

    monkeypatch.setattr(MDPOTrainer, "__init__", _with_callback(MDPOTrainer.__init__, PoisonAt(2)))
    code = cli.main(["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(demo_dir / "train.jsonl"),
                     "--image_root", str(demo_dir), "--output_dir", str(tmp_path / "o"), "--max_steps", "3",
                     "--save_steps", "1", "--lora_r", "4", "--lora_alpha", "8", "--use_cpu", "true",
                     "--disable_tqdm", "true"])
    assert code == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mdpo-fast: error:")]
    assert len(errors) == 1 and "loss is nan at step 2" in errors[0], errors
    assert "Last good checkpoint: " + str(tmp_path / "o" / "checkpoint-1") in errors[0]
    # a checkpoint every step: step 1's was written, the poisoned step 2 never saved one
    assert (tmp_path / "o" / "checkpoint-1").exists() and not (tmp_path / "o" / "checkpoint-2").exists()
