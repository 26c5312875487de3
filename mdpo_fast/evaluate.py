"""`mdpo-fast eval`: the objective's metrics of a model (a base alone, or with a run's adapters) on a data set, and
each record's summed answer log-probs of the policy and the reference exactly as training computes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from mdpo_fast.loss import BRANCH_NAMES, IMAGELESS_METRICS, mdpo_loss


class SetLogps(NamedTuple):
    """Summed answer log-probs of a set's examples: `indices [n]` (record indices), `policy` and `reference`
    `[n, 3]` (chosen, rejected, corrupted; zeros for a branch not built)."""

    indices: torch.Tensor
    policy: torch.Tensor
    reference: torch.Tensor


def heldout_metrics(trainer, dataset, policy: bool = True) -> tuple[dict[str, float], SetLogps]:
    """Over `dataset`: the loss and every training metric (the imageless ones where that branch is built), and the
    image reliance of the policy (`image/swap_accuracy`, `image/swap_margin`) and of the reference (`ref_image/...`,
    computed once per set), as docs/DESIGN.md defines them. Without `policy` the policy is the reference (a base
    model alone). Returns the metrics and the set's log-probs."""
    args = trainer.args
    indices, mine, reference = trainer.branch_logps(dataset, args.num_branches, policy=policy)
    mine = mine if policy else reference
    loss, metrics = mdpo_loss(mine, reference, beta=args.beta, anchor=args.anchor, weights=args.loss_weights)
    built = args.num_branches
    result = {"loss": loss.item(), **{name: value.item() for name, value in metrics.items()
                                      if built == len(BRANCH_NAMES) or name not in IMAGELESS_METRICS}}
    swap, ref_metrics = reference_swap(trainer, dataset, SetLogps(indices, mine, reference))
    if len(swap):
        if policy:
            swap_indices, swapped, _ = trainer.branch_logps(swap, 1, reference=False)
            result.update(swap_metrics(indices, mine[:, 0], swap_indices, swapped[:, 0]))
        else:
            result.update({k[len("ref_"):]: v for k, v in ref_metrics.items()})
        result.update(ref_metrics)
    return result, SetLogps(indices, mine, reference)


def reference_swap(trainer, dataset, logps: SetLogps | None = None) -> tuple:
    """`(swap dataset, the reference's ref_image/... metrics)` of a held-out set, computed once per trainer and set
    (the reference never changes); `logps`: the set's log-probs if at hand. Call it before a full fine-tuning
    run lets its reference copy go."""
    from mdpo_fast.heldout import SwapDataset

    if id(dataset) not in trainer.image_swaps:  # the swap dataset holds the set: its id is not reused
        swap = SwapDataset(dataset, trainer.args.seed)
        metrics = {}
        if len(swap):
            if logps is None:
                logps = trainer.branch_logps(dataset, 1, policy=False)
            ref = trainer.branch_logps(swap, 1, policy=False)
            metrics = swap_metrics(logps.indices, logps.reference[:, 0], ref.indices, ref.reference[:, 0])
        trainer.image_swaps[id(dataset)] = swap, {f"ref_{k}": v for k, v in metrics.items()}
    return trainer.image_swaps[id(dataset)]


def swap_metrics(indices, own, swap_indices, swapped) -> dict[str, float]:
    """`image/swap_accuracy`: the share of examples whose chosen answer is likelier with its own image than with the
    swapped one; `image/swap_margin`: the mean log-prob difference. `own` [n] by example `indices`, `swapped` [k]
    by `swap_indices`."""
    row = {int(i): k for k, i in enumerate(indices.tolist())}
    diff = own[[row[int(i)] for i in swap_indices.tolist()]] - swapped
    return {"image/swap_accuracy": (diff > 0).float().mean().item(), "image/swap_margin": diff.mean().item()}


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
    result, (indices, policy, reference) = heldout_metrics(trainer, dataset, policy=adapter is not None)
    built = args.num_branches
    result["examples"] = len(indices)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if per_example is not None:
        names = BRANCH_NAMES[:built]
        with open(per_example, "w", encoding="utf-8") as f:
            for index, mine, ref in zip(indices.tolist(), policy[:, :built].tolist(), reference[:, :built].tolist(),
                                        strict=True):
                row = {"index": index, "logps": dict(zip(names, mine, strict=True)),
                       "ref_logps": dict(zip(names, ref, strict=True))}
                f.write(json.dumps(row) + "\n")
    return result
