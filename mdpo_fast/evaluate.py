"""`mdpo-fast eval`: the objective's metrics of a model (a base alone, or with a run's adapters) on a data set, and
each record's summed answer log-probs of the policy and the reference exactly as training computes them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mdpo_fast.loss import BRANCH_NAMES, IMAGELESS_METRICS, mdpo_loss


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
    from mdpo_fast.modeling import load_pretrained, sequence_logps
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
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.per_device_eval_batch_size,
                                         collate_fn=trainer.data_collator, num_workers=args.dataloader_num_workers)
    policy, reference, indices = [], [], []
    with torch.no_grad():
        for batch in loader:
            batch = trainer._prepare_inputs(batch)
            trainer.check_layout(batch, model)  # the first batch against the model's own forward, as in training
            ref = trainer.reference_logps(batch)
            policy.append(sequence_logps(model, *trainer.answer_tokens(model, batch)) if adapter else ref)
            reference.append(ref)
            indices.append(batch["example_index"])
    policy, reference, indices = torch.cat(policy).cpu(), torch.cat(reference).cpu(), torch.cat(indices).tolist()
    loss, metrics = mdpo_loss(policy, reference, beta=args.beta, anchor=args.anchor, weights=args.loss_weights)
    built = args.num_branches
    result = {"loss": loss.item(), **{name: value.item() for name, value in metrics.items()
                                      if built == len(BRANCH_NAMES) or name not in IMAGELESS_METRICS}}
    result["examples"] = len(indices)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if per_example is not None:
        names = BRANCH_NAMES[:built]
        with open(per_example, "w", encoding="utf-8") as f:
            for index, mine, ref in zip(indices, policy[:, :built].tolist(), reference[:, :built].tolist(),
                                        strict=True):
                row = {"index": index, "logps": dict(zip(names, mine, strict=True)),
                       "ref_logps": dict(zip(names, ref, strict=True))}
                f.write(json.dumps(row) + "\n")
    return result
