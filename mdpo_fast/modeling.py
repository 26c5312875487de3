"""Layer 4: load a vision-language model, attach LoRA, and run forwards that stop before the LM head."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from mdpo_fast.collate import IGNORE_INDEX, image_inputs
from mdpo_fast.logprobs import linear_token_logprobs, segment_logps
from mdpo_fast.loss import NUM_BRANCHES
from mdpo_fast.packing import SECOND_ANSWER, attention_mask, block_mask

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


def takes_token_types(model: nn.Module) -> bool:
    """Whether the model computes 3-D positions from `mm_token_type_ids` (the Qwen2-VL family does)."""
    base = unwrap(model)
    return hasattr(getattr(base, "model", base), "get_rope_index")


def freeze_vision(model: nn.Module) -> None:
    """Only the language model and LM head train; the vision tower and projector stay frozen."""
    head = model.get_output_embeddings()
    trainable = {id(p) for p in head.parameters()}
    for name, module in model.named_modules():
        if name.endswith("language_model"):
            trainable.update(id(p) for p in module.parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def load_model(args) -> tuple[nn.Module, nn.Module | None]:
    """`prepare_model` of the pretrained model `args.model_name_or_path` (`args`: an `MDPOConfig`)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        args.model_name_or_path, dtype=_DTYPES[args.model_dtype], attn_implementation=args.attn_implementation
    )
    return prepare_model(model, args)


def prepare_model(model: nn.Module, args) -> tuple[nn.Module, nn.Module | None]:
    """Returns `(policy, reference)`: the policy LoRA-wrapped unless `args.use_lora` is false, and the
    reference, a frozen copy for full fine-tuning or None when it is the policy with adapters disabled."""
    model.config.use_cache = False
    if not args.use_lora:
        freeze_vision(model)
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        return model, reference
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(args.seed)  # LoRA's random A matrices: one seed, one run, however the model was loaded
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=language_model_linear_names(model), bias="none",
    )
    return get_peft_model(model, lora), None


@contextlib.contextmanager
def reference_context(model: nn.Module, reference: nn.Module | None):
    """No-grad, eval-mode context whose model is the reference: the frozen copy, or the policy with adapters
    off. Eval mode keeps the reference deterministic, live or precomputed."""
    target = model if reference is None else reference
    was_training = target.training
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if reference is None:
            peft_model = model
            while not hasattr(peft_model, "disable_adapter"):
                peft_model = peft_model.module
            stack.enter_context(peft_model.disable_adapter())
        target.eval()
        try:
            yield
        finally:
            target.train(was_training)


def last_hidden_states(model: nn.Module, inputs: dict) -> torch.Tensor:
    """`[rows, T, H]` final hidden states, through the model's own forward (so DDP / FSDP hooks run) with
    the LM head applied to no position."""
    backbone = unwrap(model).model
    captured = []
    handle = backbone.register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state))
    device = next(v.device for v in inputs.values() if isinstance(v, torch.Tensor))
    try:
        model(**inputs, logits_to_keep=_NO_LOGITS.to(device), use_cache=False)
    finally:
        handle.remove()
    return captured[0]


def padded_answer_tokens(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Hidden states of the tokens that predict answer tokens, of a `PaddedCollator` batch (rows branch-major).

    Returns `(hidden [M, H], labels [M], segment_ids [M], num_examples)`, as the fused loss takes them.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **image_inputs(batch)}
    hidden = last_hidden_states(model, inputs)[:, :-1]  # position t predicts token t + 1
    labels = batch["labels"][:, 1:]
    answer = labels != IGNORE_INDEX
    rows, num_examples = labels.shape[0], labels.shape[0] // NUM_BRANCHES
    row = torch.arange(rows, device=labels.device)[:, None].expand_as(labels)[answer]
    segment_ids = NUM_BRANCHES * (row % num_examples) + row // num_examples
    return hidden[answer], labels[answer], segment_ids, num_examples


def sequence_logps(model: nn.Module, hidden, labels, segment_ids, num_examples: int) -> torch.Tensor:
    """`[B, 3]` summed answer log-probs from `answer_tokens`-style outputs, through the model's LM head."""
    weight, bias = lm_head(model)
    return segment_logps(linear_token_logprobs(hidden, weight, labels, bias=bias), segment_ids, num_examples)


def padded_branch_logps(model: nn.Module, batch: dict) -> torch.Tensor:
    """`[B, 3]` summed answer log-probs of a `PaddedCollator` batch."""
    return sequence_logps(model, *padded_answer_tokens(model, batch))


def lm_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's full `(weight [V, H], bias)`, also when the head is sharded.

    FSDP2 as accelerate (>= 1.15) sets it up keeps the LM head's unit unsharded from the forward to the
    backward (`reshard_after_forward=False` on `[final norm, lm_head]`): the fused loss uses the weight as
    it is and FSDP reduce-scatters its gradient. A head resharded after the forward is a DTensor here:
    gathered with `full_tensor()` when frozen (LoRA); trained, it is refused, since that gather's backward
    would skip FSDP's gradient reduction. A DeepSpeed ZeRO-3 head: gathered when frozen, refused when trained.
    """
    head = unwrap(model).get_output_embeddings()
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):  # an FSDP2-sharded DTensor
        if weight.requires_grad:
            raise ValueError("the fused loss cannot train an LM head that FSDP reshards after the forward: keep "
                             "its unit unsharded (reshard_after_forward=False, as accelerate >= 1.15 does) or "
                             "use LoRA (the default)")
        return weight.full_tensor(), None if bias is None else bias.full_tensor()
    if hasattr(weight, "ds_id"):  # a DeepSpeed ZeRO-3 partitioned parameter
        if weight.requires_grad:
            raise ValueError("the fused loss cannot train a ZeRO-3-partitioned LM head yet: use LoRA (the "
                             "default), ZeRO-2 or FSDP")
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight] + ([bias] if bias is not None else [])):
            return weight.detach().clone(), None if bias is None else bias.detach().clone()
    return weight, bias


def image_features(model: nn.Module, batch: dict) -> list[torch.Tensor]:
    """Features of each distinct image of a packed batch, through the frozen vision tower and projector once.

    Frozen, they are the same for the policy and the reference, so both forwards reuse them.
    """
    with torch.no_grad():
        out = unwrap(model).model.get_image_features(**image_inputs(batch), return_dict=True)
    return list(out.pooler_output)


def packed_answer_tokens(model: nn.Module, batch: dict, features: list[torch.Tensor]):
    """As `padded_answer_tokens`, for a `PackedCollator` batch and its `image_features`."""
    base = unwrap(model)
    input_ids = batch["input_ids"]
    embeds = base.get_input_embeddings()(input_ids)
    slots = input_ids == base.config.image_token_id
    placed = torch.cat([features[i] for i in batch["image_order"].tolist()]).to(embeds.dtype)
    if int(slots.sum()) != placed.shape[0]:
        raise ValueError(f"{int(slots.sum())} image tokens in the batch but {placed.shape[0]} image features")
    embeds = embeds.masked_scatter(slots[..., None], placed)
    impl = base.config.get_text_config()._attn_implementation
    positions = batch["position_ids"]
    rope = batch.get("rope_position_ids")  # [3, R, L]: the positions of M-RoPE models (Qwen2-VL family)
    if impl.startswith("flash_attention"):
        # varlen: one flat sequence, segments marked by position ids restarting at 0 (flat indices unchanged)
        if bool((batch["roles"] == SECOND_ANSWER).any()):
            raise ValueError("flash-attn varlen cannot express a shared prefix: use --prefix_sharing false, "
                             "or --attn_implementation flex_attention")
        embeds, positions, mask = embeds.flatten(0, 1)[None], positions.flatten()[None], None
        if rope is not None:  # M-RoPE models take the 1-D positions that mark segments as a leading 4th row
            positions = torch.cat([positions[None], rope.flatten(1)[:, None]])
    else:
        positions = positions if rope is None else rope
        if impl == "flex_attention":
            mask = block_mask(batch["unit_ids"], batch["roles"])
        else:  # a dense [R, 1, L, L] mask, built here on the batch's device
            mask = attention_mask(batch["unit_ids"], batch["roles"])
            if impl == "eager":  # eager adds the mask to the scores
                mask = torch.zeros(mask.shape, dtype=embeds.dtype, device=mask.device).masked_fill_(
                    ~mask, torch.finfo(embeds.dtype).min)
    inputs = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
    hidden = last_hidden_states(model, inputs).flatten(0, 1)[batch["predictor_index"]]
    return hidden, batch["target_ids"], batch["segment_ids"], batch["example_index"].shape[0]
