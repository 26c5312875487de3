"""One optimizer step: the published mDPO data flow vs mdpo-fast, same model, data, steps and device.

    python -m benchmarks.step --quick                   # CPU, tiny model: ends with `speedup=<x> memory_ratio=<y>`
    python -m benchmarks.step --model llava-1.5-7b      # GPU: random weights in LLaVA-1.5-7B's shapes, bf16
    python -m benchmarks.step --model qwen2.5-vl-3b     # GPU: the same in Qwen2.5-VL-3B's shapes

Providers, each in a fresh process: `published` (benchmarks/published_step.py), `trl_dpo` (the same at
loss weights 1 0 0: TRL's DPO step, the step users compare with; left out when the run is plain DPO,
where `published` is that step), `padded` (mdpo-fast's
plain path: 3B padded rows, live reference, fused loss) and `mdpo_fast` (the defaults: packed rows,
shared prefix, each image encoded once, reference log-probs precomputed; the precompute pass is
timed apart). Data: a synthetic length mix shaped like LLaVA-1.5 on RLAIF-V: 576 image tokens (256
for Qwen2.5-VL at 448x448), prompts of 20-80 words and answers of 30-300 for the GPU models; scaled
by 1/4 for the tiny one (16 image tokens). Memory is the peak RSS of the process (CPU) or peak
allocated GPU memory. On GPU, MFU counts `6 * P * T` FLOPs per step for the language model's P
parameters and the T answer-and-prompt tokens of the step's examples (each counted once), against the
measured dense bf16 rate.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "step.jsonl"
PROVIDERS = ("published", "trl_dpo", "padded", "mdpo_fast")
LAYOUT = {
    "published": {"packing": False, "precompute_ref_logps": False},
    "trl_dpo": {"packing": False, "precompute_ref_logps": False, "loss_weights": [1.0, 0.0, 0.0]},
    "padded": {"packing": False, "precompute_ref_logps": False},
    "mdpo_fast": {},
    # on request: mdpo_fast with packed rows under one dense SDPA mask, or attended unit by unit (the CPU default)
    "dense_sdpa": {"packed_attention": "dense"},
    "unit_sdpa": {"packed_attention": "units"},
}


# CPU shapes of the tiny LLaVA: image size (patch 8), width, layers, prompt and answer words (a word is a token)
CPU_SHAPES = {
    # the demo's proportions: 16 image tokens, short prompts and answers, hidden 128
    "tiny": dict(image_size=32, hidden_size=128, num_layers=2, prompt=(5, 20), answer=(7, 75)),
    # LLaVA-1.5 on RLAIF-V at a quarter scale: 144 image tokens, prompts 20-60, answers 30-200, hidden 256
    "llava-quarter": dict(image_size=96, hidden_size=256, num_layers=4, prompt=(20, 60), answer=(30, 200)),
}


def length_mix_records(n: int, seed: int = 0, prompt=(20, 80), answer=(30, 300), image_size: int = 32):
    """Synthetic records: one of the demo images, prompts and answers of word counts drawn from the ranges."""
    from mdpo_fast.demo_data import demo_rows
    from mdpo_fast.records import parse_record
    from mdpo_fast.tiny import WORDS

    rng = random.Random(seed)
    images = [row["image"] for row in demo_rows(16, seed, size=image_size)]

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."

    return [parse_record({"image": rng.choice(images), "question": words(*prompt), "chosen": words(*answer),
                          "rejected": words(*answer)}, i) for i in range(n)]


def _random_bf16(model_cls, config, device: str):
    """Random weights made straight on `device` in bf16 (no fp32 copy on the host first)."""
    import torch

    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.set_attn_implementation("sdpa")
    return model


def build_llava_7b(device: str):
    """Random weights in LLaVA-1.5-7B's shapes (CLIP ViT-L/14-336 + Llama-2-7B), bf16, built in code."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mdpo_fast.tiny import build_processor

    processor = build_processor(image_size=336, patch_size=14)  # 576 image tokens, as LLaVA-1.5
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       pad_token_id=processor.tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    return _random_bf16(LlavaForConditionalGeneration, config, device), processor


def build_qwen25_vl_3b(device: str):
    """Random weights in Qwen2.5-VL-3B's shapes (its windowed ViT + merger, a 36-layer M-RoPE decoder), bf16."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from mdpo_fast.tiny import build_processor

    processor = build_processor("qwen2_5_vl")
    processor.image_processor = Qwen2VLImageProcessorPil(min_pixels=448 * 448, max_pixels=448 * 448)  # 256 tokens
    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                pad_token_id=processor.tokenizer.pad_token_id, tie_word_embeddings=True)
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=processor.image_token_id,
                              tie_word_embeddings=True)
    return _random_bf16(Qwen2_5_VLForConditionalGeneration, config, device), processor


GPU_MODELS = {"llava-1.5-7b": (build_llava_7b, 336), "qwen2.5-vl-3b": (build_qwen25_vl_3b, 448)}


def run_provider(provider: str, steps: int, warmup: int, batch_size: int, n: int, out_dir: str,
                 model_name: str = "tiny", loss_weights=(1, 1, 1), profile: bool = False) -> dict:
    import torch
    from transformers import TrainerCallback

    from benchmarks.published_step import PublishedStepTrainer
    from mdpo_fast.cli import parse_config
    from mdpo_fast.data import prepare_dataset
    from mdpo_fast.modeling import prepare_model
    from mdpo_fast.tiny import build_processor, build_tiny_model
    from mdpo_fast.trainer import MDPOTrainer

    torch.manual_seed(0)
    gpu = model_name in GPU_MODELS
    if gpu:
        build, image_size = GPU_MODELS[model_name]
        model, processor = build("cuda")
        lengths = {"prompt": (20, 80), "answer": (30, 300)}
    else:
        shape = CPU_SHAPES[model_name]
        processor = build_processor()
        processor.image_processor.size = {"shortest_edge": shape["image_size"]}
        processor.image_processor.crop_size = {"height": shape["image_size"], "width": shape["image_size"]}
        model, processor = build_tiny_model(processor, hidden_size=shape["hidden_size"],
                                            num_layers=shape["num_layers"])
        image_size, lengths = shape["image_size"], {"prompt": shape["prompt"], "answer": shape["answer"]}
    args = parse_config([], {
        "output_dir": out_dir, "use_cpu": not gpu, "max_steps": warmup + steps, "bf16": gpu,
        "per_device_train_batch_size": batch_size, "learning_rate": 1e-4, "lora_r": 64 if gpu else 16,
        # every step logs its token count (outside the timed span: Trainer logs after on_step_end)
        "lora_alpha": 128 if gpu else 32, "save_strategy": "no", "logging_steps": 1, "report_to": "none",
        "disable_tqdm": True, "max_length": 2048 if gpu else 1024, "loss_weights": list(loss_weights),
        **LAYOUT[provider],
    })
    records = length_mix_records(n, image_size=image_size, **lengths)
    dataset = prepare_dataset(args, processor, records=records, source="length mix")
    policy, reference = prepare_model(model, args)
    cls = PublishedStepTrainer if provider in ("published", "trl_dpo") else MDPOTrainer
    trainer = cls(policy, args, dataset, processor, reference_model=reference)
    del reference  # the trainer's alone: precomputing frees it, as a run does
    precompute_s = 0.0
    start = time.perf_counter()
    if cls is MDPOTrainer:  # once per run (before the precompute, else at the first step): timed apart
        trainer.check_layout()
    check_s = time.perf_counter() - start
    if args.precompute_ref_logps:
        start = time.perf_counter()
        trainer.precompute_reference()
        precompute_s = time.perf_counter() - start

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    trainer.add_callback(Clock())
    profiler = _profile_after(trainer, warmup, gpu) if profile else None
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    # token positions through the model per step (logged), and model passes over them: policy forward + backward
    # (2) and, where live, the reference forward (1)
    tokens = [entry["tokens/model"] for entry in trainer.state.log_history if "tokens/model" in entry]
    live = not args.precompute_ref_logps or cls is PublishedStepTrainer
    passes = [t * (3 / 2 if live else 2) for t in tokens]
    measured = sorted(times[warmup:])
    step_s = measured[len(measured) // 2]
    row = {
        "provider": provider, "step_s_median": step_s, "examples_per_s": batch_size / step_s,
        "tokens_per_step": sum(tokens[warmup:]) / steps, "tokens_per_s": sum(tokens[warmup:]) / steps / step_s,
        "passes_per_step": sum(passes[warmup:]) / steps, "precompute_s": precompute_s, "layout_check_s": check_s,
        "precompute_passes_per_example": _precompute_passes(dataset, args) if args.precompute_ref_logps else 0.0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if profiler is not None:
        from benchmarks.step_phases import breakdown

        row["phases_ms"] = breakdown(profiler, steps, "cuda" if gpu else "cpu")
    if gpu:
        from benchmarks.kernels import matmul_tflops

        lm_params = sum(p.numel() for n_, p in model.named_parameters() if "language_model" in n_)
        useful = sum(len(e.prompt_ids) * 2 + 2 * len(e.chosen_ids) + len(e.rejected_ids)
                     for e in dataset.examples) / len(dataset) * batch_size  # tokens per step, each once
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["mfu"] = 6 * lm_params * useful / step_s / 1e12 / matmul_tflops("cuda", torch.bfloat16)
    return row


def _precompute_passes(dataset, args) -> float:
    """Token positions per example of the reference precompute: one forward over the packed branches."""
    from mdpo_fast.packing import packed_length

    return sum(packed_length(e, args.prefix_sharing, args.num_branches) for e in dataset.examples) / len(dataset)


def _profile_after(trainer, warmup: int, gpu: bool):
    """A torch.profiler over the steps after the first `warmup`, with the trainer's phases labelled."""
    import torch
    from transformers import TrainerCallback

    from benchmarks.step_phases import label

    label(trainer)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    profiler = torch.profiler.profile(activities=activities)

    class Window(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                profiler.__enter__()

        def on_train_end(self, *_, **__):
            profiler.__exit__(None, None, None)

    trainer.add_callback(Window())
    return profiler


def _ratios(rows: dict, batch_size: int, n: int) -> dict:
    """Each provider against the published step: measured examples/s ratio per step and over one epoch with the
    reference precompute, beside the token-count ideal (model passes over token positions) of each."""
    base = rows["published"]
    trl = rows.get("trl_dpo", base)
    steps_per_epoch = n / batch_size
    out = {}
    for name, r in rows.items():
        epoch_s = r["precompute_s"] + steps_per_epoch * r["step_s_median"]
        base_epoch_s = base["precompute_s"] + steps_per_epoch * base["step_s_median"]
        epoch_passes = r["passes_per_step"] + r["precompute_passes_per_example"] * batch_size
        out[name] = {"step": base["step_s_median"] / r["step_s_median"],
                     "step_ideal": base["passes_per_step"] / r["passes_per_step"],
                     "epoch": base_epoch_s / epoch_s, "epoch_ideal": base["passes_per_step"] / epoch_passes,
                     "vs_trl_dpo_step": trl["step_s_median"] / r["step_s_median"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU tiny-model comparison (under 2 minutes)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    parser.add_argument("--model", default="tiny", choices=[*CPU_SHAPES, *GPU_MODELS])
    parser.add_argument("--loss_weights", type=float, nargs=3, default=[1.0, 1.0, 1.0],
                        help="1 0 0: plain DPO, where the published step is TRL's DPO step")
    parser.add_argument("--profile", action="store_true", help="time per phase (torch.profiler) after warm-up")
    parser.add_argument("--results", type=Path, default=RESULTS.parent)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row = run_provider(args.child, args.steps, args.warmup, args.batch_size, args.examples,
                           f"{args.out_dir}/{args.child}", args.model, args.loss_weights, args.profile)
        print(json.dumps(row))
        return
    rows = {}
    scratch = tempfile.TemporaryDirectory()  # fresh: nothing cached (reference log-probs) from an earlier run
    args.out_dir = args.out_dir or scratch.name
    plain_dpo = args.loss_weights == [1.0, 0.0, 0.0]
    for provider in args.providers:
        if provider == "trl_dpo" and plain_dpo:
            continue  # the published step is TRL's DPO step already
        cmd = [sys.executable, "-m", "benchmarks.step", "--child", provider, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch_size", str(args.batch_size), "--examples", str(args.examples),
               "--out_dir", args.out_dir, "--model", args.model, "--loss_weights", *map(str, args.loss_weights),
               *(["--profile"] if args.profile else [])]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        if out.returncode:
            sys.exit(f"{provider} failed:\n{out.stderr[-3000:]}")
        rows[provider] = json.loads(out.stdout.strip().splitlines()[-1])
    from benchmarks.record import result_row, write_result

    ratios = _ratios(rows, args.batch_size, args.examples) if "published" in rows else {}
    print(f"{'provider':10s} {'step ms':>9s} {'examples/s':>11s} {'tokens/step':>12s} {'peak RSS MiB':>13s} "
          f"{'precompute s':>13s} {'x step (ideal)':>15s} {'x epoch (ideal)':>16s} {'x TRL DPO step':>15s}")
    for name, r in rows.items():
        x = ratios.get(name)
        vs = (f"{x['step']:6.2f} ({x['step_ideal']:.2f}) {x['epoch']:8.2f} ({x['epoch_ideal']:.2f}) "
              f"{x['vs_trl_dpo_step']:15.2f}") if x else ""
        print(f"{name:10s} {1e3 * r['step_s_median']:9.1f} {r['examples_per_s']:11.1f} {r['tokens_per_step']:12.0f} "
              f"{r['peak_rss_mib']:13.0f} {r['precompute_s']:13.2f} {vs}")
    if args.profile:
        from benchmarks.step_phases import PHASES

        print("ms per step by phase: " + " ".join(f"{p:>14s}" for p in PHASES))
        for name, r in rows.items():
            print(f"{name:21s} " + " ".join(f"{r['phases_ms'][p]:14.1f}" for p in PHASES))
    gpu = args.model in GPU_MODELS
    if gpu:
        for r in rows.values():
            print(f"{r['provider']:10s} peak GPU memory {r['peak_gpu_mib']:.0f} MiB, MFU {100 * r['mfu']:.1f}%")
    write_result(args.results / "step.jsonl", result_row(
        "step", device="cuda" if gpu else "cpu", dtype="bfloat16" if gpu else "float32",
        shape={"batch": args.batch_size, "examples": args.examples, "model": args.model,
               "loss_weights": args.loss_weights, "steps": args.steps, "warmup": args.warmup},
        providers=rows, ratios=ratios))
    if ratios and "mdpo_fast" in rows:
        memory = "peak_gpu_mib" if gpu else "peak_rss_mib"
        print(f"speedup={ratios['mdpo_fast']['step']:.2f} "
              f"memory_ratio={rows['mdpo_fast'][memory] / rows['published'][memory]:.2f}")


if __name__ == "__main__":
    main()
