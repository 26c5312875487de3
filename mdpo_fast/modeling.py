"""Layer 4: load a vision-language model, attach LoRA, and run forwards that stop before the LM head."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from mdpo_fast.collate import IGNORE_INDEX
from mdpo_fast.logprobs import linear_token_logprobs, segment_logps
from mdpo_fast.loss import NUM_BRANCHES

# An empty index: the model's own LM head computes logits for no position at all.
_NO_LOGITS = torch.zeros(0, dtype=torch.long)

_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / compile / peft wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def language_model_linear_names(model: nn.Module) -> list[str]:
    """Every linear layer of the language model (LoRA targets); the vision tower, projector and LM head excluded."""
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".language_model." in f".{name}."
    ]
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layers under a 'language_model' module")
    return names


def freeze_vision(model: nn.Module) -> None:
    """Only the language model and LM head train; the vision tower and projector stay frozen."""
    head = model.get_output_embeddings()
    trainable = {id(p) for p in head.parameters()}
    for name, module in model.named_modules():
        if name.endswith("language_model"):
            trainable.update(id(p) for p in module.parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def load_model_and_processor(args):
    """Model (LoRA-wrapped unless `args.use_lora` is false), processor and, for full fine-tuning, a frozen
    reference copy. `args` is an `MDPOConfig`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = _DTYPES[args.model_dtype]
    model = AutoModelForImageTextToText.from_pretrained(
        args.model_name_or_path, dtype=dtype, attn_implementation=args.attn_implementation
    )
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    return prepare_model(model, args), processor


def prepare_model(model: nn.Module, args) -> tuple[nn.Module, nn.Module | None]:
    """Returns `(policy, reference)`; the reference is None when it is the policy with adapters disabled."""
    model.config.use_cache = False
    if not args.use_lora:
        freeze_vision(model)
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        return model, reference
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=language_model_linear_names(model), bias="none",
    )
    return get_peft_model(model, lora), None


def reference_context(model: nn.Module, reference: nn.Module | None):
    """No-grad context whose model is the reference: the frozen copy, or the policy with adapters off."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if reference is None:
        peft_model = model
        while not hasattr(peft_model, "disable_adapter"):
            peft_model = peft_model.module
        stack.enter_context(peft_model.disable_adapter())
    return stack


def last_hidden_states(model: nn.Module, inputs: dict) -> torch.Tensor:
    """`[rows, T, H]` final hidden states, through the model's own forward (so DDP / FSDP hooks run) with
    the LM head applied to no position."""
    backbone = unwrap(model).model
    captured = []
    handle = backbone.register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state))
    try:
        model(**inputs, logits_to_keep=_NO_LOGITS.to(inputs["input_ids"].device), use_cache=False)
    finally:
        handle.remove()
    return captured[0]


def answer_tokens(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Hidden states of the tokens that predict answer tokens, of a `PaddedCollator` batch (rows branch-major).

    Returns `(hidden [M, H], labels [M], segment_ids [M], num_examples)`, as the fused loss takes them.
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_index")}
    hidden = last_hidden_states(model, inputs)[:, :-1]  # position t predicts token t + 1
    labels = batch["labels"][:, 1:]
    answer = labels != IGNORE_INDEX
    rows, num_examples = labels.shape[0], labels.shape[0] // NUM_BRANCHES
    row = torch.arange(rows, device=labels.device)[:, None].expand_as(labels)[answer]
    segment_ids = NUM_BRANCHES * (row % num_examples) + row // num_examples
    return hidden[answer], labels[answer], segment_ids, num_examples


def padded_branch_logps(model: nn.Module, batch: dict) -> torch.Tensor:
    """`[B, 3]` summed answer log-probs of a `PaddedCollator` batch."""
    hidden, labels, segment_ids, num_examples = answer_tokens(model, batch)
    head = unwrap(model).get_output_embeddings()
    token_logps = linear_token_logprobs(hidden, head.weight, labels, bias=head.bias)
    return segment_logps(token_logps, segment_ids, num_examples)
