"""The data path at a real size: preparation (first and cached run), resident memory, loader throughput.

    python -m benchmarks.data_scale --records 3000 --family llava       # LLaVA-1.5 shapes: 336 px, 576 tokens
    python -m benchmarks.data_scale --records 3000 --family qwen2_5_vl  # Qwen2.5-VL's dynamic resolution

Data: RLAIF-V-shaped records (`image, question, chosen, rejected`) with 640x480 JPEGs (about 40 KB, made
in code) in a dataset saved with `save_to_disk`, as users hold RLAIF-V. The processor is the family's
real image processor at hub settings with the tiny tokenizer; reference precompute is off. Each phase
runs in a fresh process so the cache and the memory figures are honest: `prepare` twice (first and
cached), then `load` (the trainer's default dataloader over the prepared set).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "data_scale.jsonl"


def write_dataset(directory: Path, n: int, seed: int = 0) -> None:
    """`n` RLAIF-V-shaped records with distinct 640x480 JPEG photos-to-be (smooth colour fields plus noise)."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    # a few smooth colour fields and a noise field, larger than a photo; each record crops them at random offsets
    bases = [np.stack([np.sin(xx * a + k), np.cos(yy * b - k), np.sin((xx + yy) * c)], -1) * 110 + 110
             for k, (a, b, c) in enumerate(rng.uniform(0.002, 0.02, (8, 3)))]
    noise = rng.normal(0, 12, (960, 1280, 3)).astype(np.float32)
    words = "the a red blue green small large object image shows left right top bottom near far".split()

    def rows():
        for i in range(n):
            y, x = rng.integers(0, 480), rng.integers(0, 640)
            pixels = (bases[i % len(bases)] + noise[y:y + 480, x:x + 640]).clip(0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=80)

            def text(k):
                return " ".join(rng.choice(words, k))
            yield {"image": {"bytes": buf.getvalue(), "path": None}, "question": text(int(rng.integers(8, 30))),
                   "chosen": text(int(rng.integers(30, 120))), "rejected": text(int(rng.integers(30, 120)))}

    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "chosen": datasets.Value("string"), "rejected": datasets.Value("string")})
    datasets.Dataset.from_generator(rows, features=features).save_to_disk(str(directory))


def hub_shaped_processor(family: str):
    """The family's processor at its hub checkpoints' image settings, with the tiny tokenizer."""
    from mdpo_fast.tiny import CHAT_TEMPLATE, build_tokenizer

    if family == "llava":
        from transformers import CLIPImageProcessorPil, LlavaProcessor

        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CHAT_TEMPLATE)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

        from mdpo_fast.processors import image_only

        return image_only(Qwen2_5_VLProcessor)(image_processor=Qwen2VLImageProcessorPil(),
                                               tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE)
    raise ValueError(f"family must be llava or qwen2_5_vl, got {family!r}")


def _memory_mib() -> dict:
    """Resident memory now (not the peak): in all (VmRSS), private (RssAnon: objects, freed heap not returned) and
    of mapped files (RssFile: the example table and the data set's pages, page cache shared with the loader
    workers and reclaimable)."""
    import gc

    gc.collect()
    with open("/proc/self/status", encoding="utf-8") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {name: int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "RssAnon", "RssFile")}


def phase(args) -> dict:
    """One phase in this process: `prepare` (returns ms/record and resident memory) or `load` (examples/s)."""
    from mdpo_fast.cli import parse_config
    from mdpo_fast.data import prepare_dataset

    processor = hub_shaped_processor(args.family)
    config = parse_config([], {"output_dir": args.out, "use_cpu": True, "report_to": "none", "dataset": args.data,
                               "max_length": 4096, "precompute_ref_logps": False, "packing": False,
                               "per_device_train_batch_size": 8})
    import datasets  # noqa: F401  (imported before the baseline, as preparation imports it)

    before = _memory_mib()
    start = time.perf_counter()
    dataset = prepare_dataset(config, processor)
    seconds = time.perf_counter() - start
    from mdpo_fast.packing import packed_length

    [packed_length(ex) for ex in dataset.examples]  # as the trainer's sampler does: every example read once
    after = _memory_mib()
    kib = {name: 1024 * (after[name] - before[name]) / len(dataset) for name in after}
    row = {"ms_per_record": 1000 * seconds / len(dataset), "records": len(dataset),
           "rss_per_record_kib": kib["VmRSS"], "anon_per_record_kib": kib["RssAnon"]}
    if args.phase == "load":
        import torch

        # the Trainer's dataloader settings over the dataset (image processing and corruption per item); the
        # collator is left out, it is cheap next to the images
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=8, shuffle=True, collate_fn=lambda items: items,
            num_workers=config.dataloader_num_workers, persistent_workers=config.dataloader_num_workers > 0,
            prefetch_factor=config.dataloader_prefetch_factor if config.dataloader_num_workers else None,
        )
        n, start = 0, None
        for i, batch in enumerate(loader):
            if i == 2:  # after the workers' start-up
                start, n = time.perf_counter(), 0
            n += len(batch)
            if start is not None and n >= args.load_examples:
                break
        row = {"loader_examples_per_s": n / (time.perf_counter() - start),
               "num_workers": config.dataloader_num_workers}
    return row


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        start = time.perf_counter()
        write_dataset(data, args.records)
        print(f"wrote {args.records} records in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        env = {**os.environ, "MDPO_FAST_CACHE": str(Path(tmp) / "cache")}
        results = {}
        for name, which in (("first", "prepare"), ("cached", "prepare"), ("load", "load")):
            cmd = [sys.executable, "-m", "benchmarks.data_scale", "--phase", which, "--data", str(data),
                   "--out", str(Path(tmp) / "out"), "--family", args.family,
                   "--load-examples", str(args.load_examples)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(name, results[name], file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--family", default="llava", choices=("llava", "qwen2_5_vl"))
    parser.add_argument("--load-examples", type=int, default=400)
    parser.add_argument("--phase", choices=("prepare", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args)))
        return
    from benchmarks.record import result_row, write_result

    r = run(args)
    row = result_row("data_scale", device="cpu", dtype="-", shape={"records": args.records, "family": args.family,
                                                                     "cores": os.cpu_count()},
                     first_ms_per_record=r["first"]["ms_per_record"], cached_ms_per_record=r["cached"]["ms_per_record"],
                     rss_per_record_kib=r["cached"]["rss_per_record_kib"],
                     anon_per_record_kib=r["cached"]["anon_per_record_kib"],
                     first_rss_per_record_kib=r["first"]["rss_per_record_kib"],
                     first_anon_per_record_kib=r["first"]["anon_per_record_kib"],
                     loader_examples_per_s=r["load"]["loader_examples_per_s"], num_workers=r["load"]["num_workers"])
    write_result(RESULTS, row)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
