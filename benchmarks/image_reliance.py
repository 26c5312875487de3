"""Does mDPO make a model look at the image where DPO does not? The paper's central claim at toy scale.

    python -m benchmarks.image_reliance   # CPU, minutes on 2 cores: a table, results/image_reliance.{jsonl,png}

A synthetic preference set made in code (`demo_data`: coloured shapes at places; the rejected answer gets one
colour, shape or place wrong, so the image decides which answer is right) with a text-only cue added: every chosen
answer opens with "Looking closely, ", every rejected one with "At a glance, ". Plain DPO (`--loss_weights 1 0 0`,
with `--imageless_metrics true` to measure the corrupted-image branch) and mDPO (`1 1 1`) train the tiny LLaVA
from the same start, seed, data and steps; both are evaluated on the same held-out fifth of the set
(`--eval_split 0.2`) every `--eval_steps`: `rewards/accuracies` (chosen over rejected), `rewards/imageless_accuracies`
(chosen with its image over chosen with the corrupted image) and `image/swap_accuracy` (chosen likelier with its
own image than with another held-out example's; the reference's value is the untrained model's).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RUNS = {"DPO": [1.0, 0.0, 0.0], "mDPO": [1.0, 1.0, 1.0]}
METRICS = ("rewards/accuracies", "rewards/imageless_accuracies", "image/swap_accuracy")
CUES = ("Looking closely, ", "At a glance, ")  # chosen, rejected


def cue_records(n: int, seed: int):
    """The demo set with the text-only cue on every answer."""
    from mdpo_fast.demo_data import demo_rows
    from mdpo_fast.records import parse_record

    rows = demo_rows(n, seed)
    for row in rows:
        for key, cue in zip(("chosen", "rejected"), CUES, strict=True):
            row[key] = cue + row[key][0].lower() + row[key][1:]
    return [parse_record(row, i) for i, row in enumerate(rows)]


def train(weights: list[float], records, steps: int, eval_steps: int, seed: int, out_dir: str) -> list[dict]:
    """The held-out evaluations of one run (its `eval_` log entries)."""
    from mdpo_fast.cli import DEMO_DEFAULTS, parse_config, run_training
    from mdpo_fast.tiny import build_tiny_model

    args = parse_config([], {
        **DEMO_DEFAULTS, "output_dir": out_dir, "max_steps": steps, "eval_split": 0.2, "eval_steps": eval_steps,
        "logging_steps": eval_steps, "save_strategy": "no", "seed": seed, "loss_weights": weights,
        "imageless_metrics": True, "report_to": "none", "disable_tqdm": True, "eval_on_start": True,
    })
    model, processor = build_tiny_model(seed=seed)
    trainer = run_training(args, model, processor, records, source="cue set")
    return [entry for entry in trainer.state.log_history if "eval_loss" in entry]


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, metric in zip(axes, METRICS, strict=True):
        for name, evals in runs.items():
            ax.plot([e["step"] for e in evals], [e[f"eval_{metric}"] for e in evals], marker="o", label=name)
        ax.set_title(f"held-out {metric}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=640)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    from benchmarks.record import result_row, write_result

    records = cue_records(args.records, args.seed)
    runs, start = {}, time.perf_counter()
    for name, weights in RUNS.items():
        with tempfile.TemporaryDirectory() as out:
            runs[name] = train(weights, records, args.steps, args.eval_steps, args.seed, out)
    seconds = time.perf_counter() - start
    print(f"held out: {len(records) - round(0.8 * len(records))} examples; the reference's (untrained) image swap "
          f"accuracy {runs['DPO'][0]['eval_ref_image/swap_accuracy']:.3f}")
    header = " ".join(f"{name} {m.split('/')[-1]:>20s}" for name in runs for m in METRICS)
    print(f"{'step':>5s} {header}")
    for i, entry in enumerate(runs["DPO"]):
        cells = " ".join(f"{runs[name][i][f'eval_{m}']:{len(name) + 21}.3f}" for name in runs for m in METRICS)
        print(f"{entry['step']:5d} {cells}")
    args.results.mkdir(parents=True, exist_ok=True)
    plot(runs, args.results / "image_reliance.png")
    keep = ("step", "eval_loss", *(f"eval_{m}" for m in METRICS), "eval_image/swap_margin",
            "eval_ref_image/swap_accuracy")
    write_result(args.results / "image_reliance.jsonl", result_row(
        "image_reliance", device="cpu", dtype="float32", seconds=seconds,
        shape={"records": args.records, "steps": args.steps, "eval_split": 0.2, "model": "tiny", "seed": args.seed},
        runs={name: [{k: e[k] for k in keep if k in e} for e in evals] for name, evals in runs.items()}))
    print(f"{seconds:.0f} s; plot: {args.results / 'image_reliance.png'}")


if __name__ == "__main__":
    main()
