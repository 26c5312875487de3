"""Layer 4: load a vision-language model, attach LoRA, and run forwards that stop before the LM head."""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import NamedTuple

import torch
from torch import nn

from mdpo_fast import unit_attention
from mdpo_fast.collate import IGNORE_INDEX, image_inputs
from mdpo_fast.families.base import family_for
from mdpo_fast.ops.logprobs import linear_token_logprobs, segment_logps
from mdpo_fast.ops.loss import NUM_BRANCHES
from mdpo_fast.packing import SECOND_ANSWER, attention_mask, block_mask, unit_masks

# An empty index: the model's own LM head computes logits for no position at all.
_NO_LOGITS = torch.zeros(0, dtype=torch.long)

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / compile / peft wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def language_model_linear_names(model: nn.Module) -> list[str]:
    """Every linear layer of the language model (LoRA targets); the vision tower, projector and LM head excluded."""
    decoder = family_for(unwrap(model).config).language_model
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and f".{decoder}." in f".{name}."
    ]
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layers under a {decoder!r} module")
    return names


def freeze_vision(model: nn.Module) -> None:
    """Only the language model and LM head train; the vision tower and projector stay frozen."""
    head = model.get_output_embeddings()
    trainable = {id(p) for p in head.parameters()}
    decoder = family_for(unwrap(model).config).language_model
    for name, module in model.named_modules():
        if name.endswith(decoder):
            trainable.update(id(p) for p in module.parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def load_pretrained(args) -> nn.Module:
    """The pretrained model `args.model_name_or_path` in `args.model_dtype` with `args.attn_implementation`."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        args.model_name_or_path, dtype=DTYPES[args.model_dtype], attn_implementation=args.attn_implementation
    )


def attention_implementation(model: nn.Module) -> str:
    """The decoder's attention implementation (transformers keeps it private on the text config): read here only."""
    return unwrap(model).config.get_text_config()._attn_implementation


def choose_packed_attention(model: nn.Module, choice: str, device: torch.device) -> str:
    """Packed rows' attention, decided once per model (by the trainer): with SDPA, unit by unit (`unit_attention`;
    `choice` "units", or "auto" on CPU; on GPU dense SDPA stays until measured against it there, `benchmarks/
    step.py`'s `unit_sdpa`) or one dense mask per row. Sets the model's implementation; returns it."""
    impl = attention_implementation(model)
    sdpa = impl in ("sdpa", unit_attention.NAME)  # a model an earlier trainer switched is still SDPA
    units = choice == "units" or (choice == "auto" and device.type == "cpu")
    if choice == "units" and not sdpa:
        raise ValueError(f"packed_attention units runs SDPA unit by unit; this model's attention is {impl}")
    if sdpa:
        unwrap(model).set_attn_implementation({"text_config": unit_attention.NAME if units else "sdpa"})
    return attention_implementation(model)


class Models(NamedTuple):
    """The `policy` to train and its `reference`: a frozen copy for full fine-tuning, None when the reference is the
    policy with its LoRA adapters off."""

    policy: nn.Module
    reference: nn.Module | None


class LMHead(NamedTuple):
    """The LM head's full `weight [V, H]` and `bias [V]` (None for a head without one)."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def load_model(args) -> Models:
    """`prepare_model` of the pretrained model `args.model_name_or_path` (`args`: an `MDPOConfig`)."""
    return prepare_model(load_pretrained(args), args)


def prepare_model(model: nn.Module, args) -> Models:
    """The `Models` of `model`: the policy LoRA-wrapped unless `args.use_lora` is false."""
    model.config.use_cache = False
    if not args.use_lora:
        freeze_vision(model)
        return Models(model, copy.deepcopy(model).eval().requires_grad_(False))
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(args.seed)  # LoRA's random A matrices: one seed, one run, however the model was loaded
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=language_model_linear_names(model), bias="none",
    )
    return Models(get_peft_model(model, lora), None)


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


class AnswerTokens(NamedTuple):
    """A batch's answer tokens, every branch of every example, as the fused loss takes them: `hidden [M, H]`, the
    final hidden states of the tokens that predict them, `labels [M]`, `segment_ids [M]` (`3 * example + branch`)."""

    hidden: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor
    num_examples: int


def padded_answer_tokens(model: nn.Module, batch: dict) -> AnswerTokens:
    """The `AnswerTokens` of a `PaddedCollator` batch (rows branch-major)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **image_inputs(batch),
              **batch.get("text_inputs", {})}
    hidden = last_hidden_states(model, inputs)[:, :-1]  # position t predicts token t + 1
    labels = batch["labels"][:, 1:]
    answer = labels != IGNORE_INDEX
    rows, num_examples = labels.shape[0], batch["example_index"].shape[0]  # B rows per branch built
    row = torch.arange(rows, device=labels.device)[:, None].expand_as(labels)[answer]
    segment_ids = NUM_BRANCHES * (row % num_examples) + row // num_examples
    return AnswerTokens(hidden[answer], labels[answer], segment_ids, num_examples)


def sequence_logps(model: nn.Module, tokens: AnswerTokens) -> torch.Tensor:
    """`[B, 3]` summed answer log-probs of a batch's `AnswerTokens`, through the model's LM head."""
    weight, bias = lm_head(model)
    token_logps = linear_token_logprobs(tokens.hidden, weight, tokens.labels, bias=bias, softcap=logit_softcap(model),
                                        check_ranges=False)  # the collators' labels: token ids by construction
    return segment_logps(token_logps, tokens.segment_ids, tokens.num_examples)


def logit_softcap(model: nn.Module) -> float | None:
    """The model's final logit soft-capping (`c * tanh(logits / c)`, Gemma 2 decoders), which the fused loss
    applies as the LM head's forward does; None for plain logits."""
    return getattr(unwrap(model).config.get_text_config(), "final_logit_softcapping", None)


def lm_head(model: nn.Module) -> LMHead:
    """The model's `LMHead`, whole also when the head is sharded.

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
        return LMHead(weight.full_tensor(), None if bias is None else bias.full_tensor())
    if hasattr(weight, "ds_id"):  # a DeepSpeed ZeRO-3 partitioned parameter
        if weight.requires_grad:
            raise ValueError("the fused loss cannot train a ZeRO-3-partitioned LM head yet: use LoRA (the "
                             "default), ZeRO-2 or FSDP")
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight] + ([bias] if bias is not None else [])):
            return LMHead(weight.detach().clone(), None if bias is None else bias.detach().clone())
    return LMHead(weight, bias)


def image_features(model: nn.Module, batch: dict):
    """The model's `get_image_features` output for a packed batch's images (in placeholder order), through the
    frozen vision tower and projector once; None for a batch without images.

    Frozen, they are the same for the policy and the reference, so both forwards reuse them.
    """
    inputs = image_inputs(batch)
    if not inputs:
        return None
    encode = unwrap(model).model.get_image_features
    accepted = inspect.signature(encode).parameters
    with torch.no_grad():
        return encode(**{k: v for k, v in inputs.items() if k in accepted}, return_dict=True)


def packed_attention(model: nn.Module, batch: dict, dtype: torch.dtype):
    """The packed rows' attention mask in the form the decoder takes: one mask, or one per layer type where the
    decoder mixes full and sliding-window layers. Dense `[R, 1, L, L]` (bool; additive for eager), FlexAttention
    block masks, or for unit attention placeholders. Returns `(mask, inputs)`, the decoder's further inputs
    (unit attention's `unit_layout`)."""
    config = unwrap(model).config
    text = config.get_text_config()
    impl = attention_implementation(model)
    layout = dict(units=batch["unit_ids"], roles=batch["roles"], positions=batch["position_ids"],
                  groups=batch.get("groups"), window_limits_groups=family_for(config).window_limits_groups)

    units = None
    if impl == unit_attention.NAME:
        spans = unit_attention.unit_spans(batch["unit_ids"].tolist())
        units = unit_attention.UnitLayout(*batch["unit_ids"].shape, spans)

    def build(window):
        if units is not None:
            return units.placeholder(unit_masks(units.spans, **layout, window=window), batch["unit_ids"].device)
        if impl == "flex_attention":
            return block_mask(**layout, window=window)
        mask = attention_mask(**layout, window=window)
        if impl == "eager":  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        return mask

    layer_types = set(getattr(text, "layer_types", None) or ())
    if not layer_types:  # one kind for every layer: sliding wherever a window is set (Mistral)
        use_window = getattr(text, "use_sliding_window", True)
        mask = build(getattr(text, "sliding_window", None) if use_window else None)
    elif "sliding_attention" not in layer_types:
        mask = build(None)
    else:
        mask = {kind: build(text.sliding_window if kind == "sliding_attention" else None) for kind in layer_types}
    return mask, ({} if units is None else {"unit_layout": units})


def packed_answer_tokens(model: nn.Module, batch: dict, features) -> AnswerTokens:
    """The `AnswerTokens` of a `PackedCollator` batch and its `image_features`: the model's own forward places the
    features and runs the decoder with the packed rows' positions and attention."""
    base = unwrap(model)
    input_ids = batch["input_ids"]
    impl = attention_implementation(model)
    positions = batch["position_ids"] + family_for(base.config).position_offset
    rope = batch.get("rope_position_ids")  # [axes, R, L]: the positions of M-RoPE models
    if impl.startswith("flash_attention"):
        # varlen: one flat sequence, segments marked by position ids restarting at 0 (flat indices unchanged)
        if bool((batch["roles"] == SECOND_ANSWER).any()) or "groups" in batch:
            raise ValueError("flash-attn varlen can express neither a shared prefix nor bidirectional attention: "
                             "use --prefix_sharing false (causal families), or --attn_implementation flex_attention")
        input_ids, positions, mask = input_ids.flatten()[None], positions.flatten()[None], None
        if rope is not None:  # M-RoPE models take the 1-D positions that mark segments as a leading row
            positions = torch.cat([positions[None], rope.flatten(1)[:, None]])
        text_inputs = {k: v.flatten()[None] for k, v in batch["text_inputs"].items()}
    else:
        mask, attention_inputs = packed_attention(model, batch, base.get_input_embeddings().weight.dtype)
        positions = positions if rope is None else rope
        text_inputs = {**batch["text_inputs"], **attention_inputs}
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, **text_inputs}
    if features is not None:
        inputs["mm_encoder_outputs"] = {"image": features}
    hidden = last_hidden_states(model, inputs).flatten(0, 1)[batch["predictor_index"]]
    return AnswerTokens(hidden, batch["target_ids"], batch["segment_ids"], batch["example_index"].shape[0])
