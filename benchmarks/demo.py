"""Time `mdpo-fast demo` end to end and record its reward accuracies: `python -m benchmarks.demo`."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.record import result_row, write_result


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mdpo_fast.cli", "demo", "--output_dir", out, "--disable_tqdm", "true"],
                       check=True, capture_output=True)
        seconds = time.perf_counter() - start
        logs = [e for e in json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]
                if "rewards/accuracies" in e]
    first, last = logs[0], logs[-1]
    row = result_row("demo", device="cpu", dtype="float32", shape={"steps": last["step"], "model": "tiny"},
                     seconds=seconds, accuracies=[first["rewards/accuracies"], last["rewards/accuracies"]],
                     imageless_accuracies=[first["rewards/imageless_accuracies"],
                                           last["rewards/imageless_accuracies"]])
    write_result(Path(__file__).parent / "results" / "demo.jsonl", row)
    print(f"demo: {seconds:.1f} s, rewards/accuracies {row['accuracies'][0]:.3f} -> {row['accuracies'][1]:.3f}")


if __name__ == "__main__":
    main()
