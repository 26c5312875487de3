"""`mdpo-fast eval`: the objective's metrics of a model (a base alone, or with a run's adapters) on a data set, and
each record's summed answer log-probs of the policy and the reference exactly as training computes them."""

from __future__ import annotations

import json
from pathlib import Path

from mdpo_fast.heldout import heldout_metrics
from mdpo_fast.ops.loss import BRANCH_NAMES


def evaluate(args, adapter: str | None = None, per_example: str | None = None) -> dict[str, float]:
    """Metrics of `args.model_name_or_path` (with the LoRA adapters in `adapter`, if given) on `args.dataset`, in
    the layout the flags choose, written to `args.output_dir/eval_metrics.json`; with `per_example`, one JSON
    line per record with the policy's and the reference's log-probs. Without adapters the policy is the
    reference (all rewards 0)."""
    from peft import PeftModel
    from transformers import AutoConfig

    from mdpo_fast.checkpoints import check_output_dir
    from mdpo_fast.data import prepare_dataset
    from mdpo_fast.families import family_for
    from mdpo_fast.modeling import load_pretrained
    from mdpo_fast.processors import load_processor, processor_home
    from mdpo_fast.trainer import MDPOTrainer

    if args.model_name_or_path is None:
        raise ValueError("no model given: pass --model_name_or_path DIR_OR_HUB_ID")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"--adapter {adapter} holds no LoRA adapters (adapter_config.json)")
    check_output_dir(args.output_dir)
    family = family_for(AutoConfig.from_pretrained(args.model_name_or_path))
    base = args.model_name_or_path
    processor = load_processor(base if adapter is None else processor_home(adapter, base), family)
    dataset = prepare_dataset(args, processor, family=family)
    model = load_pretrained(args)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.to(args.device).eval()
    trainer = MDPOTrainer(model, args, dataset, processor, reference_model=None if adapter else model)
    trainer.check_layout(model=model)  # the first batch against the model's own forward, as in training
    result, logps = heldout_metrics(trainer, dataset, policy=adapter is not None)
    built = args.num_branches
    result["examples"] = len(logps.indices)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if per_example is not None:
        names = BRANCH_NAMES[:built]
        with open(per_example, "w", encoding="utf-8") as f:
            for index, mine, ref in zip(logps.indices.tolist(), logps.policy[:, :built].tolist(),
                                        logps.reference[:, :built].tolist(), strict=True):
                row = {"index": index, "logps": dict(zip(names, mine, strict=True)),
                       "ref_logps": dict(zip(names, ref, strict=True))}
                f.write(json.dumps(row) + "\n")
    return result
