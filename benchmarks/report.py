"""The README's performance table, generated from the newest rows of `benchmarks/results/*.jsonl`.

    python -m benchmarks.report          # rewrites the table between the README's perf-table markers
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def _rows(name: str) -> list[dict]:
    path = RESULTS / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _latest(rows: list[dict], key) -> list[dict]:
    newest = {}
    for row in rows:  # files are appended in time order: later rows win
        newest[key(row)] = row
    return list(newest.values())


def _step_lines() -> list[str]:
    lines = []
    key = lambda r: (r["device"], r["shape"]["model"], tuple(r["shape"].get("loss_weights", (1, 1, 1))))  # noqa: E731
    for row in _latest(_rows("step.jsonl"), key):
        p, model = row["providers"], row["shape"]["model"]
        weights = tuple(row["shape"].get("loss_weights", (1, 1, 1)))
        fast, base = p["mdpo_fast"], p["published"]
        memory = "peak_gpu_mib" if "peak_gpu_mib" in fast else "peak_rss_mib"
        what = "peak GPU memory" if memory == "peak_gpu_mib" else "peak RSS (dominated by the runtime at this size)"
        extra = f"; MFU {100 * fast['mfu']:.0f}% vs {100 * base['mfu']:.0f}%" if "mfu" in fast else ""
        plain = weights[1] == 0
        command = "python -m benchmarks.step " + ("--quick" if model == "tiny" else f"--model {model}") + (
            " --loss_weights " + " ".join(f"{w:g}" for w in weights) if weights != (1, 1, 1) else "") + "".join(
            f" --{name} {row['shape'][name]}" for name, default in (("steps", 12), ("warmup", 3))
            if row["shape"].get(name, default) != default)
        baseline = "TRL's DPO step (the published flow without its corrupted branch)" if plain else \
            "the published mDPO data flow"
        ratio = row.get("ratios", {}).get("mdpo_fast")
        ideal = (f" (token-count ideal {ratio['step_ideal']:.2f}x); one epoch with the reference precompute "
                 f"**{ratio['epoch']:.2f}x** (ideal {ratio['epoch_ideal']:.2f}x)") if ratio else ""
        if "trl_dpo" in p:  # an mDPO step against the step users compare with, in the same run
            ideal += f"; **{ratio['vs_trl_dpo_step']:.2f}x** TRL's DPO step ({p['trl_dpo']['examples_per_s']:.1f}/s)"
        for name, label in (("dense_sdpa", "one dense SDPA mask per row"), ("unit_sdpa", "unit attention")):
            if name in p:
                ideal += f"; {label}: {p[name]['examples_per_s']:.1f}/s"
        lines.append(
            f"| one optimizer step, {model} model, batch {row['shape']['batch']}, "
            f"{'plain DPO' if plain else 'mDPO'}: mdpo-fast defaults vs {baseline} | `{command}` | {row['device']} | "
            f"{fast['examples_per_s']:.1f} vs {base['examples_per_s']:.1f} examples/s "
            f"(**{fast['examples_per_s'] / base['examples_per_s']:.2f}x**){ideal}; "
            f"{fast['tokens_per_step']:.0f} vs {base['tokens_per_step']:.0f} token positions per step; {what} "
            f"{fast[memory] / base[memory]:.2f}x{extra} |")
    return lines


def _kernel_lines() -> list[str]:
    lines = []
    for name in sorted(p.name for p in RESULTS.glob("kernels_*.jsonl")):
        rows = _latest(_rows(name), lambda r: (r["bench"], r["device"], json.dumps(r["shape"]), r["provider"]))
        groups = {}
        for r in rows:
            groups.setdefault((r["bench"], r["device"], json.dumps(r["shape"]), r["dtype"]), {})[r["provider"]] = r
        for (bench, device, shape, dtype), by in sorted(groups.items()):
            fast, base = by.get("mdpo_fast"), by.get("torch")
            if not fast or not base or fast["peak_extra_mib"] is None:
                continue
            s = json.loads(shape)
            mm = fast.get("matmul_tflops")
            share = f", {100 * fast['tflops']['full'] / mm:.0f}% of the measured {mm:.0f} TFLOP/s matmul" if mm else ""
            lines.append(
                f"| `{bench.removeprefix('kernel_')}` forward + backward, N={s['N']} H={s['H']} V={s['V']} {dtype} | "
                f"`python -m benchmarks.kernels --op {bench.removeprefix('kernel_')}` | {device} | "
                f"{fast['ms']['full']['median']:.1f} vs {base['ms']['full']['median']:.1f} ms "
                f"(**{base['ms']['full']['median'] / fast['ms']['full']['median']:.2f}x** PyTorch with full logits); "
                f"{fast['tflops']['full']:.0f} TFLOP/s{share}; extra memory {fast['peak_extra_mib']:.0f} vs "
                f"{base['peak_extra_mib']:.0f} MiB |")
    return lines


def table() -> str:
    lines = ["| what | command | device | result |", "|---|---|---|---|"]
    lines += _step_lines()
    for row in _latest(_rows("token_counts.jsonl"), lambda r: r["bench"]):
        r = row["rows"]
        lines.append(
            "| token positions through the language model per example over 3 epochs, LLaVA-1.5 on RLAIF-V length "
            "mix, batches of 8 | `python -m benchmarks.token_counts` | - (a count) | defaults **"
            f"{r['default (packed, shared prefix, precomputed reference)']['ratio']:.2f}x** the published step's "
            f"padded layout; live reference {r['packed, shared prefix, live reference']['ratio']:.2f}x; no prefix "
            f"sharing {r['packed, no sharing, live reference']['ratio']:.2f}x |")
    lines += _kernel_lines()
    for row in _latest(_rows("logprobs_memory_cpu.jsonl"), lambda r: json.dumps(r["shape"])):
        s, m = row["shape"], row["peak_extra_mib"]
        args = "" if (s["N"], s["H"], s["V"]) == (8192, 1024, 32000) else f" {s['N']} {s['H']} {s['V']}"
        lines.append(
            f"| `linear_token_logprobs` (chunked PyTorch path) vs full-logits PyTorch, forward + backward peak extra "
            f"memory, N={s['N']} H={s['H']} V={s['V']} fp32 | `python -m benchmarks.logprobs_memory{args}` | "
            f"{row['device']} "
            f"| {m['chunked']:.0f} MiB vs {m['full_logits']:.0f} MiB ({row['ratio']:.2f}x) |")
    for row in _latest(_rows("data_scale.jsonl"), lambda r: (r["device"], r["shape"]["family"])):
        s = row["shape"]
        lines.append(
            f"| data path, {s['records']} RLAIF-V-shaped records (640x480 JPEGs), {s['family']}-shaped processor, "
            f"{s['cores']} cores: first preparation, cached re-run, resident memory, default loader | "
            f"`python -m benchmarks.data_scale --records {s['records']} --family {s['family']}` | {row['device']} | "
            f"{row['first_ms_per_record']:.1f} ms/record first, {row['cached_ms_per_record']:.3f} ms/record cached; "
            f"{_resident(row)}; {row['loader_examples_per_s']:.0f} examples/s ({row['num_workers']} loader worker) |")
    for row in _latest(_rows("image_reliance.jsonl"), lambda r: r["bench"]):
        last = {name: evals[-1] for name, evals in row["runs"].items()}
        cells = "; ".join(
            f"{name}: `rewards/accuracies` {e['eval_rewards/accuracies']:.2f}, `imageless_accuracies` "
            f"{e['eval_rewards/imageless_accuracies']:.2f}, `image/swap_accuracy` {e['eval_image/swap_accuracy']:.2f}"
            for name, e in last.items())
        lines.append(
            f"| image reliance, held out, after {row['shape']['steps']} steps of plain DPO and of mDPO from one start "
            f"(cue set: the image decides, a text cue also separates) | `python -m benchmarks.image_reliance` | "
            f"{row['device']} | {cells} (untrained: swap {last['DPO']['eval_ref_image/swap_accuracy']:.2f}) |")
    for row in _latest(_rows("demo.jsonl"), lambda r: r["bench"]):
        a = row["accuracies"]
        lines.append(f"| `mdpo-fast demo` ({row['shape']['steps']} steps, tiny model), wall time | "
                     f"`python -m benchmarks.demo` | {row['device']} | {row['seconds']:.0f} s; `rewards/accuracies` "
                     f"{a[0]:.2f} -> {a[1]:.2f} |")
    return "\n".join(lines)


def _resident(row: dict) -> str:
    if "anon_per_record_kib" not in row:  # rows from before the split was measured
        return f"{row['rss_per_record_kib']:.1f} KiB/record resident"
    return (f"resident per record: {row['anon_per_record_kib']:.1f} KiB private + "
            f"{row['rss_per_record_kib'] - row['anon_per_record_kib']:.1f} KiB mapped file pages cached, "
            f"{row['first_anon_per_record_kib']:.1f} + "
            f"{row['first_rss_per_record_kib'] - row['first_anon_per_record_kib']:.1f} KiB after a first run")


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    readme.write_text(text[:start] + "\n" + table() + "\n" + text[end:])
    print(table())


if __name__ == "__main__":
    main()
