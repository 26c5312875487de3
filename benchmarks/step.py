"""One optimizer step: the published mDPO data flow vs mdpo-fast, same model, data, steps and device.

    python -m benchmarks.step --quick     # CPU, tiny model: ends with `speedup=<x> memory_ratio=<y>`

Providers, each in a fresh process: `published` (benchmarks/published_step.py), `padded` (mdpo-fast's
plain path: 3B padded rows, live reference, fused loss) and `mdpo_fast` (the defaults: packed rows,
shared prefix, each image encoded once, reference log-probs precomputed; the precompute pass is
timed apart). Data: a synthetic length mix shaped like LLaVA-1.5 on RLAIF-V, scaled to the tiny
model (16 image tokens, prompts of 5-20 words, answers of 8-75). Memory is the peak RSS of the
process (CPU) or peak allocated GPU memory.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "step.jsonl"
PROVIDERS = ("published", "padded", "mdpo_fast")
LAYOUT = {
    "published": {"packing": False, "precompute_ref_logps": False},
    "padded": {"packing": False, "precompute_ref_logps": False},
    "mdpo_fast": {},
}


def length_mix_records(n: int, seed: int = 0):
    """Synthetic records: one of the demo images, a prompt of 5-20 words, answers of 8-75 words."""
    from mdpo_fast.demo_data import demo_rows
    from mdpo_fast.records import parse_record
    from mdpo_fast.tiny import _WORDS

    rng = random.Random(seed)
    images = [row["image"] for row in demo_rows(16, seed)]

    def words(lo, hi):
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    return [parse_record({"image": rng.choice(images), "question": words(5, 20), "chosen": words(8, 75),
                          "rejected": words(8, 75)}, i) for i in range(n)]


def run_provider(provider: str, steps: int, warmup: int, batch_size: int, n: int, out_dir: str) -> dict:
    import torch
    from transformers import TrainerCallback

    from benchmarks.published_step import PublishedStepTrainer
    from mdpo_fast.cli import parse_config
    from mdpo_fast.data import prepare_dataset
    from mdpo_fast.modeling import prepare_model
    from mdpo_fast.ref_cache import precompute_ref_logps
    from mdpo_fast.tiny import build_tiny_model
    from mdpo_fast.trainer import MDPOTrainer

    torch.manual_seed(0)
    model, processor = build_tiny_model()
    args = parse_config([], {
        "output_dir": out_dir, "use_cpu": not torch.cuda.is_available(), "max_steps": warmup + steps,
        "per_device_train_batch_size": batch_size, "learning_rate": 1e-4, "lora_r": 16, "lora_alpha": 32,
        "save_strategy": "no", "logging_steps": 10_000, "report_to": "none", "disable_tqdm": True,
        "max_length": 512, **LAYOUT[provider],
    })
    dataset = prepare_dataset(args, processor, records=length_mix_records(n), source="length mix")
    policy, reference = prepare_model(model, args)
    cls = PublishedStepTrainer if provider == "published" else MDPOTrainer
    trainer = cls(policy, args, dataset, processor, reference_model=reference)
    precompute_s = 0.0
    if args.precompute_ref_logps:
        start = time.perf_counter()
        dataset.ref_logps = precompute_ref_logps(trainer)
        precompute_s = time.perf_counter() - start

    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    trainer.add_callback(Clock())
    real_count = trainer._count
    trainer._count = lambda stats, live_reference: (
        tokens.append(int(stats[0] + stats[1]) * (2 if live_reference else 1)), real_count(stats, live_reference))
    trainer.train()
    measured = sorted(times[warmup:])
    step_s = measured[len(measured) // 2]
    return {
        "provider": provider, "step_s_median": step_s, "examples_per_s": batch_size / step_s,
        "tokens_per_step": sum(tokens[warmup:]) / steps, "precompute_s": precompute_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU tiny-model comparison (under 2 minutes)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out_dir", default="/tmp/mdpo-step-bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row = run_provider(args.child, args.steps, args.warmup, args.batch_size, args.examples,
                           f"{args.out_dir}/{args.child}")
        print(json.dumps(row))
        return
    rows = {}
    for provider in args.providers:
        cmd = [sys.executable, "-m", "benchmarks.step", "--child", provider, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch_size", str(args.batch_size), "--examples", str(args.examples),
               "--out_dir", args.out_dir]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        if out.returncode:
            sys.exit(f"{provider} failed:\n{out.stderr[-3000:]}")
        rows[provider] = json.loads(out.stdout.strip().splitlines()[-1])
    from benchmarks.record import result_row, write_result

    base = rows.get("published")
    print(f"{'provider':10s} {'step ms':>9s} {'examples/s':>11s} {'tokens/step':>12s} {'peak RSS MiB':>13s} "
          f"{'precompute s':>13s}")
    for r in rows.values():
        print(f"{r['provider']:10s} {1e3 * r['step_s_median']:9.1f} {r['examples_per_s']:11.1f} "
              f"{r['tokens_per_step']:12.0f} {r['peak_rss_mib']:13.0f} {r['precompute_s']:13.2f}")
    write_result(RESULTS, result_row("step", device="cpu", dtype="float32",
                                     shape={"batch": args.batch_size, "examples": args.examples, "model": "tiny"},
                                     providers=rows))
    if base and "mdpo_fast" in rows:
        fast = rows["mdpo_fast"]
        print(f"speedup={fast['examples_per_s'] / base['examples_per_s']:.2f} "
              f"memory_ratio={fast['peak_rss_mib'] / base['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
