"""Two CPU processes (gloo): DDP through torchrun trains exactly like one process with the same global batch;
under FSDP2 sharding the fused loss gets the LM head right (accelerate runs FSDP only on GPUs, so
`tests/fsdp_head.py` shards with `fully_shard` itself)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _losses(out: Path) -> list[tuple[float, float, float]]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [(e["loss"], e["grad_norm"], e["rewards/margins"]) for e in history if "rewards/margins" in e]


def _demo(out, launcher, batch) -> None:
    flags = ["demo", "--max_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size", str(batch),
             "--output_dir", str(out), "--disable_tqdm", "true", "--save_strategy", "no"]
    result = subprocess.run([sys.executable, *launcher, "-m", "mdpo_fast.cli", *flags], capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


def _assert_same_steps(one: Path, two: Path) -> None:
    one_losses, two_losses = _losses(one), _losses(two)
    assert len(one_losses) == len(two_losses) == 3
    for a, b in zip(one_losses, two_losses, strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    _demo(tmp_path / "one", [], 8)
    _demo(tmp_path / "two", ["-m", "torch.distributed.run", "--nproc_per_node", "2"], 4)
    _assert_same_steps(tmp_path / "one", tmp_path / "two")
    history = json.loads((tmp_path / "two" / "trainer_state.json").read_text())["log_history"]
    single = json.loads((tmp_path / "one" / "trainer_state.json").read_text())["log_history"]
    assert history[0]["images/encoded"] == single[0]["images/encoded"]  # per-step totals over both processes


def test_lm_head_under_fsdp2_sharding():
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "tests/fsdp_head.py"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "rank 0: ok" in result.stdout and "rank 1: ok" in result.stdout  # lines of two processes may interleave
