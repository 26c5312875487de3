"""`mdpo-fast` command line: train, demo, tiny-model, demo-data."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

USAGE = """usage: mdpo-fast COMMAND [flags]

commands:
  train        train a model: mdpo-fast train --model_name_or_path DIR --dataset data.jsonl --output_dir out
               [--config run.yaml] [any MDPOConfig / TrainingArguments flag]
  demo         train the tiny built-in model on synthetic data on CPU (accepts the same flags)
  tiny-model   mdpo-fast tiny-model DIR [FAMILY]: write a tiny random-weight model of a family (a model type:
               llava (default), llava_next, llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl, glm4v, gemma3,
               paligemma, paligemma2, internvl, aya_vision, idefics3, smolvlm, mistral3) and its processor
  demo-data    mdpo-fast demo-data DIR [N]: write the synthetic set as DIR/train.jsonl + DIR/images/
  eval         mdpo-fast eval --model_name_or_path BASE [--adapter DIR] --dataset D [--image_root R]
               [--per_example FILE.jsonl] [layout and objective flags]: the objective's metrics of a model on a
               data set (printed, and OUTPUT_DIR/eval_metrics.json), and each record's log-probs if asked
  export       mdpo-fast export CHECKPOINT OUT_DIR [--model_name_or_path BASE] [--model_dtype DTYPE]: merge a LoRA
               run's adapters into the base weights, written with the processor as a standard checkpoint
"""

# The demo's defaults; any flag given on the command line overrides them.
DEMO_DEFAULTS = {
    "output_dir": "mdpo-demo",
    "max_steps": 300,
    "per_device_train_batch_size": 8,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "constant",
    "lora_r": 16,
    "lora_alpha": 32,
    "logging_steps": 25,
    "save_steps": 100,
    "save_total_limit": 1,
    "max_length": 128,
    "use_cpu": True,
    "eval_split": 0.1,  # held out, evaluated every logging_steps
}


def _yaml_to_flags(path: str) -> list[str]:
    import yaml

    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of field: value")
    return _to_flags(values)


def _to_flags(values: dict) -> list[str]:
    """`{field: value}` as command-line flags (lists as several values, booleans as true / false)."""
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        flags.append(f"--{key}")
        items = value if isinstance(value, list) else [value]
        flags += [str(v).lower() if isinstance(v, bool) else str(v) for v in items]
    return flags


def parse_config(argv: list[str], defaults: dict | None = None):
    """`MDPOConfig` from defaults, then `--config run.yaml`, then flags (later ones win)."""
    from transformers import HfArgumentParser

    from mdpo_fast.config import MDPOConfig

    argv = list(argv)
    yaml_flags = []
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path")
        yaml_flags = _yaml_to_flags(argv[at + 1])
        del argv[at : at + 2]
    flags = _to_flags(defaults or {}) + yaml_flags + argv
    parser = HfArgumentParser(MDPOConfig, prog="mdpo-fast")
    (config,) = parser.parse_args_into_dataclasses(args=flags)
    return config


def run_training(args, model=None, processor=None, records=None, source=None):
    """Validate the data, load the model, train, save. Returns the trainer."""
    from mdpo_fast.checkpoints import check_output_dir, resume_checkpoint
    from mdpo_fast.data import prepare_dataset
    from mdpo_fast.families.base import trainable_family
    from mdpo_fast.modeling import load_model, prepare_model
    from mdpo_fast.trainer import MDPOTrainer

    if model is None and args.model_name_or_path is None:
        raise ValueError("no model given: pass --model_name_or_path DIR_OR_HUB_ID")
    # Where the run writes and what it resumes from, before any data or weights load.
    check_output_dir(args.output_dir)
    resume = resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if model is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model_name_or_path)
    else:
        config = model.config
    family = trainable_family(config)  # before any weight loads
    if processor is None:
        from mdpo_fast.processors import load_processor

        processor = load_processor(args.model_name_or_path, family)
    # Data first: a bad record stops the run before the model is loaded or a GPU is touched.
    dataset = prepare_dataset(args, processor, records=records, source=source, family=family)
    eval_dataset = None
    if args.eval_dataset:
        eval_dataset = prepare_dataset(args, processor, family=family, path=args.eval_dataset,
                                       split=args.eval_dataset_split)
    elif args.eval_split:
        from mdpo_fast.heldout import split_dataset

        dataset, eval_dataset = split_dataset(dataset, args.eval_split, args.seed)
    if model is None:
        model, reference = load_model(args)
    else:
        model, reference = prepare_model(model, args)
    trainer = MDPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor, reference_model=reference,
        eval_dataset=eval_dataset,
    )
    del reference  # the trainer's alone, so precomputing the reference frees a full fine-tuning copy
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.save_state()
    return trainer


def run_demo(argv: list[str]):
    from mdpo_fast.demo_data import demo_records
    from mdpo_fast.tiny import build_tiny_model

    args = parse_config(argv, DEMO_DEFAULTS)
    model = processor = records = None
    if args.model_name_or_path is None:
        model, processor = build_tiny_model(seed=args.seed)
    if args.dataset is None:
        records = demo_records(n=256, seed=args.seed)
    trainer = run_training(args, model, processor, records, source="demo data" if records else None)
    print(summary(trainer.state.log_history, args.output_dir))
    return trainer


def summary(log_history: list[dict], output_dir: str) -> str:
    logs = [entry for entry in log_history if "rewards/accuracies" in entry]
    if not logs:
        return f"done; outputs in {output_dir}"
    first, last = logs[0], logs[-1]
    lines = [f"mdpo-fast demo: {last['step']} steps"]
    for name in ("loss", "rewards/accuracies", "rewards/imageless_accuracies", "rewards/margins"):
        if name not in last:  # imageless metrics: only where the corrupted-image branch was built
            continue
        start, end = f"{first[name]:8.4f} (step {first['step']})", f"{last[name]:8.4f} (step {last['step']})"
        lines.append(f"  {name:30s} {start} -> {end}")
    evals = [entry for entry in log_history if "eval_loss" in entry]
    if evals:
        first, last = evals[0], evals[-1]
        lines.append("  held out:")
        for name in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/imageless_accuracies"):
            if name in last:
                start, end = f"{first[name]:8.4f} (step {first['step']})", f"{last[name]:8.4f} (step {last['step']})"
                lines.append(f"  {name:30s} {start} -> {end}")
        if "eval_image/swap_accuracy" in last:  # the reference is the model before training
            lines.append(f"  {'eval_image/swap_accuracy':30s} {last['eval_ref_image/swap_accuracy']:8.4f} (before)  "
                         f"-> {last['eval_image/swap_accuracy']:8.4f} (step {last['step']})")
    lines.append(f"  outputs (adapters, processor, checkpoints, trainer_state.json) in {Path(output_dir).resolve()}")
    return "\n".join(lines)


def _take_flags(argv: list[str], names: tuple[str, ...]) -> tuple[dict, list[str]]:
    """`({name: value or None}, the other arguments)`: the flags `names` (`--flag value` or `--flag=value`) taken
    out of `argv`."""
    flags, rest, tokens = dict.fromkeys(names), [], iter(argv)
    for token in tokens:
        name = token.split("=", 1)[0]
        if name in flags:
            flags[name] = token.split("=", 1)[1] if "=" in token else next(tokens, None)
            if flags[name] is None:
                raise ValueError(f"{name} needs a value")
        else:
            rest.append(token)
    return flags, rest


def _export_args(rest: list[str]) -> tuple:
    """`CHECKPOINT OUT_DIR [--model_name_or_path BASE] [--model_dtype DTYPE]` as export_merged's arguments."""
    flags, positional = _take_flags(rest, ("--model_name_or_path", "--model_dtype"))
    flags["--model_dtype"] = flags["--model_dtype"] or "auto"
    if len(positional) != 2 or any(p.startswith("--") for p in positional):
        raise ValueError("usage: mdpo-fast export CHECKPOINT OUT_DIR [--model_name_or_path BASE] "
                         "[--model_dtype auto|float32|bfloat16|float16]")
    return *positional, flags["--model_name_or_path"], flags["--model_dtype"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    from mdpo_fast.layout_check import LayoutMismatchError
    from mdpo_fast.records import DataError
    from mdpo_fast.trainer import NonFiniteLossError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if command == "train":
            run_training(parse_config(rest))
        elif command == "demo":
            run_demo(rest)
        elif command == "tiny-model" and len(rest) in (1, 2):
            from mdpo_fast.tiny import write_tiny_model

            print(f"tiny model written to {write_tiny_model(rest[0], family=(rest[1:] or ['llava'])[0])}")
        elif command == "eval":
            from mdpo_fast.evaluate import evaluate

            extra, rest = _take_flags(rest, ("--adapter", "--per_example"))
            args = parse_config(rest, {"output_dir": "mdpo-eval", "precompute_ref_logps": False, "report_to": "none"})
            for name, value in evaluate(args, extra["--adapter"], extra["--per_example"]).items():
                print(f"{name:32s} {value:.6g}")
        elif command == "export":
            from mdpo_fast.export import export_merged

            print(f"merged model written to {export_merged(*_export_args(rest))}")
        elif command == "demo-data" and len(rest) in (1, 2):
            from mdpo_fast.demo_data import write_demo_data

            print(f"demo data written to {write_demo_data(rest[0], *(int(x) for x in rest[1:]))}")
        else:
            print(USAGE, file=sys.stderr)
            return 2
    except DataError as e:
        for problem in e.problems:
            print(f"mdpo-fast: error: {problem}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"mdpo-fast: error: {e}", file=sys.stderr)
        return 3
    except LayoutMismatchError as e:
        print(f"mdpo-fast: error: {e}", file=sys.stderr)
        return 4
    except ValueError as e:
        print(f"mdpo-fast: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
