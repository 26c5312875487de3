"""Every family with a tiny builder, in every layout, against the model's own plain forward of each sequence as its
processor builds it (token types, pixel masks, sizes, grids, tiles), with images of four sizes in one step; and
that what each family adds (token types, bidirectional blocks, sliding windows, positions, deepstack) matters."""

import dataclasses

import pytest
import torch

from mdpo_fast import unit_attention
from mdpo_fast.cli import parse_config, run_training
from mdpo_fast.data import prepare_dataset
from mdpo_fast.demo_data import demo_records
from mdpo_fast.families import family_for
from mdpo_fast.families.base import registered
from mdpo_fast.layout_check import LayoutMismatchError, plain_logps
from mdpo_fast.modeling import (
    attention_implementation,
    choose_packed_attention,
    prepare_model,
    reference_context,
    sequence_logps,
)
from mdpo_fast.processors import load_processor
from mdpo_fast.tiny import build_tiny_model, tiny_families, write_tiny_model
from mdpo_fast.trainer import MDPOTrainer
from tests.conftest import randomize_lora

# width x height: square, wide, tall, very wide; tiling families cut them into different numbers of tiles
SIZES = [(32, 32), (64, 32), (32, 64), (64, 16)]
LAYOUTS = {
    "padded": {"packing": False},
    "packed": {"packing": True},
    "packed-no-sharing": {"packing": True, "prefix_sharing": False},
    # plain DPO: chosen and rejected alone, no corrupted-image unit or rows
    "packed-plain-dpo": {"packing": True, "loss_weights": [1, 0, 0]},
    "padded-plain-dpo": {"packing": False, "loss_weights": [1, 0, 0]},
}
TOLERANCE = 1e-4  # fp32, summed answer log-probs


def _args(tmp_path, **values):
    return parse_config([], {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none", "lora_r": 4,
                             "lora_alpha": 8, "max_tokens_per_batch": 600, "disable_tqdm": True, **values})


def _records(n=4):
    return [dataclasses.replace(r, image=r.image.resize(SIZES[i % len(SIZES)]))
            for i, r in enumerate(demo_records(n=n, seed=5))]


def _tiny(name):
    try:
        return build_tiny_model(family=name)
    except ImportError as e:  # Mistral3's processor module imports torchvision, which CPU machines lack
        pytest.skip(f"{name}: " + " ".join(str(e).split())[:160])


@pytest.fixture(scope="module", params=tiny_families())
def setup(request, tmp_path_factory):
    model, processor = _tiny(request.param)
    family = family_for(model.config)
    args = _args(tmp_path_factory.mktemp("o"))
    policy, _ = prepare_model(model, args)
    randomize_lora(policy)
    dataset = prepare_dataset(args, processor, records=_records(), source="demo", family=family)
    plain = {}
    for adapters in (True, False):
        with torch.no_grad(), reference_context(policy, None) if not adapters else torch.enable_grad():
            plain[adapters] = torch.tensor([[
                plain_logps(policy, processor, family, ex.prompt_text, text, ex.prompt_ids, ids, image, where="test")
                for image, text, ids in zip(
                    dataset.images(i)[:1] * 2 + dataset.images(i)[1:],
                    (ex.chosen_text, ex.rejected_text, ex.chosen_text),
                    (ex.chosen_ids, ex.rejected_ids, ex.chosen_ids), strict=True)
            ] for i, ex in enumerate(dataset.examples)])
    return request.param, policy, processor, dataset, plain


def _layout_logps(policy, processor, dataset, tmp_path, **layout):
    trainer = MDPOTrainer(policy, _args(tmp_path, **layout), dataset, processor)
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        policy_logps = sequence_logps(policy, trainer.answer_tokens(policy, batch))
        ref_logps = trainer.reference_logps(batch)
    return trainer, batch, policy_logps, ref_logps


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_equals_the_plain_forward(setup, tmp_path, layout):
    name, policy, processor, dataset, plain = setup
    trainer, batch, policy_logps, ref_logps = _layout_logps(policy, processor, dataset, tmp_path, **LAYOUTS[layout])
    refused = family_for(policy.get_base_model().config).packing_refusal(policy.get_base_model().config)
    assert trainer.args.packing == (LAYOUTS[layout]["packing"] and refused is None)  # refused: padded instead
    built = trainer.args.num_branches
    torch.testing.assert_close(policy_logps[:, :built], plain[True][:, :built], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(ref_logps[:, :built], plain[False][:, :built], rtol=0, atol=TOLERANCE)
    assert (policy_logps[:, built:] == 0).all()
    if built == 2:  # no corrupted image encoded: one image per example packed, two rows per example padded
        assert batch["stats"].images == len(dataset) * (1 if trainer.args.packing else 2)
    assert (policy_logps - ref_logps).abs().max() > 100 * TOLERANCE  # the adapters matter
    assert (plain[False][:, 0] - plain[False][:, 2]).abs().min() > 100 * TOLERANCE  # so does the image


def test_unit_attention_equals_one_dense_mask(setup, tmp_path):
    """On CPU, packed rows under SDPA attend unit by unit (rows as long as the budget allows): the same hidden states
    as one dense SDPA mask over the same rows, for causal units, shared prefixes, bidirectional blocks and windows."""
    name, policy, processor, dataset, _ = setup
    trainer = MDPOTrainer(policy, _args(tmp_path), dataset, processor)
    if not trainer.args.packing or registered()[name].tiny_attn_implementation != "sdpa":
        pytest.skip(f"{name}: no packed SDPA")
    assert trainer.packed_attention == attention_implementation(policy) == unit_attention.NAME  # the CPU default
    assert trainer.data_collator.dense_hidden_size is None
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad(), reference_context(policy, None):
        units = trainer.answer_tokens(policy, batch).hidden
        try:
            assert choose_packed_attention(policy, "dense", trainer.args.device) == "sdpa"
            dense = trainer.answer_tokens(policy, batch).hidden
        finally:
            choose_packed_attention(policy, "units", trainer.args.device)
    torch.testing.assert_close(units, dense, rtol=0, atol=1e-5)


FIXED_SIZE = {"llava", "gemma3", "paligemma", "paligemma2"}  # every image resized to one size


def test_the_images_differ_in_shape_within_the_step(setup):
    name, _, _, dataset, _ = setup
    assert len({dataset.images(i)[0].size for i in range(len(dataset))}) == len(SIZES)
    shapes = {tuple(tuple(v.shape) for v in dataset[i]["image"].values()) for i in range(len(dataset))}
    lengths = {len(ex.prompt_ids) for ex in dataset.examples}
    if name not in FIXED_SIZE:  # dynamic resolution and tiles: the model's inputs differ within the step
        assert len(shapes) > 1 and len(lengths) > 1


def test_family_token_inputs_are_the_processors(setup):
    """Our per-token inputs equal those the processor returns for the whole sequence."""
    name, policy, processor, dataset, _ = setup
    family = family_for(policy.get_base_model().config)
    ex = dataset.examples[1]
    inputs = family.plain_inputs(processor, ex.prompt_text, ex.chosen_text, dataset.images(1)[0])
    ids = inputs["input_ids"]
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, len(ex.prompt_ids):] = True
    ours = family.text_inputs(ids, answer, policy.get_base_model().config)
    theirs = {k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.shape == ids.shape}
    same = {"mm_token_type_ids", "token_type_ids"}  # one name or the other, as the processor and the model spell it
    for key in theirs - {"input_ids", "attention_mask", "labels"}:
        assert key in ours or (key in same and same & set(ours)), f"{name}: the processor's {key} is not ours"
    for key, value in ours.items():
        theirs = inputs.get(key, inputs.get("mm_token_type_ids" if key == "token_type_ids" else key))
        assert theirs is not None, f"{name}: the processor returns no {key}"
        torch.testing.assert_close(value, theirs.to(value.dtype), msg=key)


def _drops(policy, batch):
    """What each family adds beside plain causal 1-D attention, as (name, how to drop it in a batch) pairs."""
    config = policy.get_base_model().config
    text = config.get_text_config()
    drops = []
    if "groups" in batch:
        drops.append(("bidirectional blocks", lambda batch, mp: batch.pop("groups")))
    if "sliding_attention" in set(getattr(text, "layer_types", None) or ()):
        drops.append(("sliding window", lambda batch, mp: mp.setattr(text, "sliding_window", 10**6)))
    if "rope_position_ids" in batch:
        drops.append(("3-D positions", lambda batch, mp: batch.__setitem__(
            "rope_position_ids", batch["position_ids"].expand_as(batch["rope_position_ids"]))))
    if getattr(getattr(config, "vision_config", None), "deepstack_visual_indexes", None):
        import mdpo_fast.modeling as modeling

        def no_deepstack(batch, mp):
            encode = modeling.image_features

            def without(model, b):
                out = encode(model, b)
                out.deepstack_features = [[torch.zeros_like(f) for f in layer] for layer in out.deepstack_features]
                return out
            mp.setattr(modeling, "image_features", without)
        drops.append(("deepstack features", no_deepstack))
    return drops


def test_what_the_family_adds_matters(setup, tmp_path, monkeypatch):
    """Each special input moves the answer log-probs at least ten times the tolerance of the exactness test, so that
    test would fail if a layout dropped it."""
    name, policy, processor, dataset, plain = setup
    trainer = MDPOTrainer(policy, _args(tmp_path), dataset, processor)
    if not trainer.args.packing:
        pytest.skip(f"{name}: packing refused, the padded layout is the model's own forward")
    collate = trainer.data_collator
    drops = _drops(policy, collate([dataset[i] for i in range(len(dataset))]))
    if not drops:
        pytest.skip(f"{name}: plain causal attention and 1-D positions, nothing beyond them to drop")
    for what, drop in drops:
        batch = collate([dataset[i] for i in range(len(dataset))])
        with monkeypatch.context() as mp:
            drop(batch, mp)
            import mdpo_fast.modeling as modeling

            with torch.no_grad(), reference_context(policy, None):
                features = modeling.image_features(policy, batch)
                wrong = sequence_logps(policy, modeling.packed_answer_tokens(policy, batch, features))
        assert (wrong - plain[False]).abs().max() > 10 * TOLERANCE, f"{name}: dropping {what} changed nothing"


def test_padded_layout_needs_the_family_token_inputs(setup, tmp_path):
    name, policy, processor, dataset, plain = setup
    trainer = MDPOTrainer(policy, _args(tmp_path, packing=False), dataset, processor)
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    if not batch["text_inputs"]:
        pytest.skip(f"{name}: no per-token inputs beside input_ids")
    batch["text_inputs"] = {}
    try:
        with torch.no_grad():
            wrong = trainer.reference_logps(batch)
    except ValueError:  # Qwen2-VL refuses to guess positions without token types: not silent either
        return
    assert (wrong - plain[False]).abs().max() > 10 * TOLERANCE


def test_run_time_check_stops_a_wrong_layout(setup, tmp_path, monkeypatch):
    """The first-batch check compares the layout in use with the plain forward: a broken layout stops the run."""
    name, policy, processor, dataset, _ = setup
    import mdpo_fast.modeling as modeling

    trainer = MDPOTrainer(policy, _args(tmp_path, per_device_train_batch_size=2), dataset, processor)
    trainer.check_layout()  # the right layout passes
    trainer.layout_checked = False
    real = modeling.last_hidden_states
    # an off-by-one layout: each answer token predicted from the hidden state one position late
    monkeypatch.setattr(modeling, "last_hidden_states", lambda model, inputs: real(model, inputs).roll(1, dims=1))
    broken = r"record \d+, (chosen|rejected|corrupted) branch: the (packed|padded) layout gives"
    with pytest.raises(LayoutMismatchError, match=broken):
        trainer.check_layout()


def test_trains_from_disk_through_the_cli_path(setup, tmp_path):
    """`mdpo-fast tiny-model DIR FAMILY` and `mdpo-fast train` on it: the processor reloads with its settings, the
    run-time check passes and a step is taken."""
    name, _, processor, _, _ = setup
    directory = write_tiny_model(tmp_path / "model", family=name)
    loaded = load_processor(str(directory))
    record = _records(n=2)[1]
    prompt = processor.apply_chat_template(list(record.prompt), tokenize=False, add_generation_prompt=True)
    assert loaded.apply_chat_template(list(record.prompt), tokenize=False, add_generation_prompt=True) == prompt
    want, got = (p(text=[prompt], images=[record.image], return_tensors="pt") for p in (processor, loaded))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)
    args = _args(tmp_path / "out", model_name_or_path=str(directory), max_steps=1, per_device_train_batch_size=2,
                 attn_implementation=registered()[name].tiny_attn_implementation, save_strategy="no")
    trainer = run_training(args, records=_records(), source="demo")
    assert trainer.layout_checked and trainer.state.global_step == 1


def test_smolvlm_checkpoints_load_without_their_video_processor(tmp_path):
    """Hub SmolVLM2 checkpoints name SmolVLMProcessor, which needs num2words and a torchvision video processor:
    they load as Idefics3Processor, which builds the same image inputs and prompts."""
    import json

    processor = build_tiny_model(family="smolvlm")[1]
    processor.save_pretrained(tmp_path)
    for file in tmp_path.glob("*.json"):
        data = json.loads(file.read_text())
        if "processor_class" in data:
            file.write_text(json.dumps({**data, "processor_class": "SmolVLMProcessor"}))
    loaded = load_processor(str(tmp_path), registered()["smolvlm"])
    record = _records(n=1)[0]
    prompt = processor.apply_chat_template(list(record.prompt), tokenize=False, add_generation_prompt=True)
    want, got = (p(text=[prompt], images=[record.image], return_tensors="pt") for p in (processor, loaded))
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)


def test_llama4_is_refused_before_any_weight_loads(tmp_path):
    from transformers import Llama4Config

    Llama4Config().save_pretrained(tmp_path)  # a config alone: no weights to load
    args = _args(tmp_path / "out", model_name_or_path=str(tmp_path), dataset="unused.jsonl")
    with pytest.raises(ValueError, match="llama4 models cannot train here: not supported yet"):
        run_training(args)


def test_a_model_type_without_an_adapter_trains_padded(tmp_path, caplog):
    model, processor = build_tiny_model()
    policy, _ = prepare_model(model, _args(tmp_path))
    dataset = prepare_dataset(_args(tmp_path), processor, records=_records(), source="demo")
    policy.get_base_model().config.model_type = "some_new_vlm"
    try:
        with caplog.at_level("WARNING", logger="mdpo_fast"):
            trainer = MDPOTrainer(policy, _args(tmp_path), dataset, processor)
    finally:
        policy.get_base_model().config.model_type = "llava"
    assert not trainer.args.packing
    assert "packing off, training in the padded layout: no family adapter knows 'some_new_vlm'" in caplog.text


def test_a_processor_without_a_chat_template_needs_one(tmp_path):
    from mdpo_fast.records import DataError

    processor = build_tiny_model()[1]
    processor.chat_template = None
    with pytest.raises(DataError, match="pass --chat_template TEMPLATE_OR_FILE"):
        prepare_dataset(_args(tmp_path), processor, records=_records(), source="demo")
    template = tmp_path / "template.jinja"
    template.write_text(build_tiny_model()[1].chat_template)
    dataset = prepare_dataset(_args(tmp_path, chat_template=str(template)), processor, records=_records(),
                              source="demo")
    assert len(dataset) == 4


def test_without_precompute_the_check_runs_at_the_first_step(tmp_path, monkeypatch):
    import mdpo_fast.trainer as trainer_module

    seen = []
    real = trainer_module.check_layout
    monkeypatch.setattr(trainer_module, "check_layout", lambda *a, **k: seen.append(a[6]) or real(*a, **k))
    model, processor = build_tiny_model()
    args = _args(tmp_path, max_steps=2, per_device_train_batch_size=2, precompute_ref_logps=False,
                 save_strategy="no")
    trainer = run_training(args, model, processor, records=_records(), source="demo")
    assert trainer.state.global_step == 2 and seen == ["packed"]  # once, at the first step


def test_the_check_reads_the_compute_dtype_under_autocast(tmp_path):
    """fp32 weights with --bf16 (autocast): both forwards run in bf16, so the check allows bf16 noise, not fp32's."""
    model, processor = build_tiny_model()
    args = _args(tmp_path, max_steps=1, per_device_train_batch_size=2, precompute_ref_logps=False,
                 save_strategy="no", bf16=True)
    trainer = run_training(args, model, processor, records=_records(), source="demo")
    assert trainer.layout_checked and trainer.state.global_step == 1


def test_image_inputs_follow_the_processors_own_image_settings(tmp_path):
    """InternVL's processor tiles images (crop_to_patches) whatever its image processor's own default: the images
    given to the model must be tiled as the prompt's image tokens were counted."""
    model, processor = build_tiny_model(family="internvl")
    processor.image_processor.crop_to_patches = False  # as a hub preprocessor_config may leave it
    family = family_for(model.config)
    dataset = prepare_dataset(_args(tmp_path), processor, records=_records(), source="demo", family=family)
    tiles = [dataset[i]["image"]["pixel_values"].shape[0] for i in range(len(dataset))]
    assert len(set(tiles)) > 1  # still tiled, differently per image size
    trainer = MDPOTrainer(prepare_model(model, _args(tmp_path))[0], _args(tmp_path), dataset, processor)
    trainer.check_layout()


@pytest.mark.parametrize("impl", ["eager", "flex_attention"])
def test_other_attention_backends_build_the_same_packed_masks(setup, tmp_path, impl, request):
    """Eager takes the masks additively, FlexAttention as block masks (its forward runs on CPU, its backward needs a
    GPU): per layer type, with bidirectional blocks and windows, they must give the plain forward's numbers too."""
    name, policy, processor, dataset, plain = setup
    if impl == "flex_attention" and name not in ("llava", "gemma3", "aya_vision", "paligemma"):
        pytest.skip("FlexAttention compiles on CPU: checked on the families whose masks differ (groups, windows)")
    base = policy.get_base_model()
    before = attention_implementation(base)
    base.set_attn_implementation(impl)
    if impl == "flex_attention":
        request.getfixturevalue("fresh_dynamo")
    try:  # the trainer lays rows out for the backend, as a run with it does
        trainer = MDPOTrainer(policy, _args(tmp_path), dataset, processor)
        if not trainer.args.packing:
            pytest.skip(f"{name}: packing refused")
        batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
        with torch.no_grad():
            got = trainer.reference_logps(batch)
    finally:
        base.set_attn_implementation(before)
    torch.testing.assert_close(got, plain[False], rtol=0, atol=TOLERANCE)


def test_the_cli_reports_a_layout_mismatch_in_one_line(monkeypatch, capsys):
    import mdpo_fast.cli as cli

    def mismatch(args):
        raise LayoutMismatchError("record 0, chosen branch: the packed layout gives log-prob -1.0, ...")

    monkeypatch.setattr(cli, "run_training", mismatch)
    assert cli.main(["train", "--output_dir", "unused"]) == 4
    assert capsys.readouterr().err == "mdpo-fast: error: record 0, chosen branch: the packed layout gives log-prob " \
        "-1.0, ...\n"
