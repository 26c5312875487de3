"""The `mdpo-fast` command line, run as a user would."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mdpo_fast.cli import parse_config

TINY_FLAGS = ["--lora_r", "8", "--lora_alpha", "16", "--max_length", "128", "--use_cpu", "true",
              "--per_device_train_batch_size", "4", "--disable_tqdm", "true"]


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "mdpo_fast.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
        timeout=600,
    )


def test_yaml_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("beta: 0.5\nloss_weights: [1, 0, 0]\nuse_lora: false\nmax_steps: 7\noutput_dir: o\n")
    args = parse_config(["--config", str(config), "--max_steps", "9"])
    assert args.beta == 0.5 and args.loss_weights == [1.0, 0.0, 0.0] and args.use_lora is False
    assert args.max_steps == 9  # a flag overrides the YAML value


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="weights must be three"):
        parse_config(["--output_dir", "o", "--loss_weights", "1", "0"])
    with pytest.raises(ValueError, match="corruption_area"):
        parse_config(["--output_dir", "o", "--corruption_area", "0.3", "0.1"])


@pytest.mark.slow
def test_train_from_files_and_missing_image_error(tmp_path, tiny_dir, demo_dir):
    lines = (demo_dir / "train.jsonl").read_text().splitlines()
    broken = json.loads(lines[1])
    broken["img_path"] = "images/does-not-exist.png"
    lines[1] = json.dumps(broken)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    result = _cli("train", "--model_name_or_path", tiny_dir, "--dataset", bad, "--image_root", demo_dir,
                  "--output_dir", tmp_path / "out", "--max_steps", "2", *TINY_FLAGS)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("mdpo-fast: error:")]
    assert errors == [f"mdpo-fast: error: {bad} record 1: image file not found: {demo_dir}/images/does-not-exist.png"]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # stopped before training started

    result = _cli("train", "--model_name_or_path", tiny_dir, "--dataset", demo_dir / "train.jsonl",
                  "--image_root", demo_dir, "--output_dir", tmp_path / "out", "--max_steps", "2",
                  "--logging_steps", "1", *TINY_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "rewards/accuracies" in e] == [1, 2]


@pytest.mark.slow
def test_demo_command_runs_and_summarizes(tmp_path):
    result = _cli("demo", "--max_steps", "4", "--logging_steps", "2", "--output_dir", tmp_path / "demo")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rewards/accuracies" in result.stdout and "rewards/imageless_accuracies" in result.stdout
    assert str((tmp_path / "demo").resolve()) in result.stdout
    assert (tmp_path / "demo" / "adapter_model.safetensors").exists()


def test_the_summary_of_a_plain_dpo_run_shows_the_metrics_it_has():
    from mdpo_fast.cli import summary

    logs = [{"step": s, "loss": 0.7 - s / 100, "rewards/accuracies": 0.5 + s / 100, "rewards/margins": s / 10}
            for s in (10, 20)]  # plain DPO logs no imageless metrics
    text = summary(logs, "out")
    assert "rewards/accuracies" in text and "0.6000 (step 10) ->   0.7000 (step 20)" in text
    assert "imageless" not in text


def test_unknown_command_and_help():
    assert _cli("frobnicate").returncode == 2
    result = _cli("--help")
    assert result.returncode == 0 and "tiny-model" in result.stdout


@pytest.mark.slow
def test_train_a_qwen2_vl_model_from_disk(tmp_path, demo_dir):
    # Loads its processor without torchvision (image-only) where torchvision is missing, as here.
    assert _cli("tiny-model", tmp_path / "qwen", "qwen2_vl").returncode == 0
    result = _cli("train", "--model_name_or_path", tmp_path / "qwen", "--dataset", demo_dir / "train.jsonl",
                  "--image_root", demo_dir, "--output_dir", tmp_path / "out", "--max_steps", "2",
                  "--logging_steps", "1", *TINY_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    logs = [e for e in state["log_history"] if "rewards/accuracies" in e]
    assert [e["step"] for e in logs] == [1, 2] and all(e["loss"] > 0 for e in logs)
    saved = json.loads((tmp_path / "out" / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor"


def test_tiny_model_and_demo_data_commands(tmp_path):
    assert _cli("tiny-model", tmp_path / "m").returncode == 0
    assert (tmp_path / "m" / "config.json").exists()
    result = _cli("tiny-model", tmp_path / "x", "gpt2")
    assert result.returncode == 2 and "no tiny model of 'gpt2': expected one of" in result.stderr
    assert _cli("demo-data", tmp_path / "d", 5).returncode == 0
    assert len((tmp_path / "d" / "train.jsonl").read_text().splitlines()) == 5
    assert len(list(Path(tmp_path / "d" / "images").iterdir())) == 5
