"""The packed layout: hand-checked on a toy example, and exact against the padded path on the tiny model."""

import random

import pytest
import torch

from mdpo_fast import unit_attention
from mdpo_fast.cli import parse_config
from mdpo_fast.collate import PaddedCollator
from mdpo_fast.data import prepare_dataset
from mdpo_fast.demo_data import demo_records
from mdpo_fast.examples import Example
from mdpo_fast.modeling import prepare_model
from mdpo_fast.packing import PackedCollator, attention_mask, packed_length, unit_masks
from mdpo_fast.ref_cache import RefLogpStore
from mdpo_fast.sampler import LengthGroupedSampler
from mdpo_fast.tiny import build_tiny_model
from mdpo_fast.trainer import MDPOTrainer
from tests.conftest import randomize_lora

IMG = 9


def _item(index, prompt, chosen, rejected):
    return {"example": Example(index, None, prompt, chosen, rejected),
            "image": {"pixel_values": torch.zeros(1, 3, 2, 2)},
            "corrupted_image": {"pixel_values": torch.ones(1, 3, 2, 2)}}


def test_shared_prefix_layout_by_hand():
    batch = PackedCollator(0, IMG, 100)([_item(7, (5, IMG, IMG, 6), (10, 11), (20, 21, 22))])
    #       prefix(m)      chosen   rejected      prefix(m')      chosen
    assert batch["input_ids"].tolist() == [[5, 9, 9, 6, 10, 11, 20, 21, 22, 5, 9, 9, 6, 10, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 4, 5, 6, 0, 1, 2, 3, 4, 5]]
    # the first rejected token is predicted by the last prefix token (3), not by chosen's last token (5)
    assert batch["predictor_index"].tolist() == [3, 4, 3, 6, 7, 12, 13]
    assert batch["target_ids"].tolist() == [10, 11, 20, 21, 22, 10, 11]
    assert batch["segment_ids"].tolist() == [0, 0, 1, 1, 1, 2, 2]
    # image inputs follow the placeholders: m (zeros) then m' (ones)
    assert batch["images"]["pixel_values"][:, 0, 0, 0].tolist() == [0, 1] and batch["example_index"].tolist() == [7]
    mask = attention_mask(batch["unit_ids"], batch["roles"])[0, 0]
    assert mask[6, :4].all() and not mask[6, 4:6].any() and mask[6, 6]  # rejected: prefix and itself
    assert mask[5, :6].all() and not mask[5, 6:].any()  # chosen: causal over prefix and itself
    assert not mask[9:, :9].any() and mask[14, 9:].all()  # the corrupted unit sees only itself


def test_unit_masks_are_the_dense_masks_blocks_and_none_where_causal():
    """Unit attention's per-unit masks: exactly the dense mask's diagonal blocks, or None (SDPA's own causal
    attention) where that block is plain causal; the padding at a row's end is one span."""
    items = [_item(0, (5, IMG, IMG, 6), (10, 11), (20, 21, 22)), _item(1, (5, IMG, 6), (12,), (23,))]
    batch = PackedCollator(0, IMG, 100)(items)
    units, roles = batch["unit_ids"], batch["roles"]
    ragged = torch.cat([units, torch.tensor([[-1, -2, -3]])], dim=1)  # padding: a unit per token
    spans = unit_attention.unit_spans(ragged.tolist())
    assert spans == [(0, 0, 9), (0, 9, 15), (0, 15, 20), (0, 20, 24), (0, 24, 27)]
    spans = spans[:-1]
    positions = batch["position_ids"]
    groups = torch.full_like(units, -1)
    groups[0, 21:23] = 0  # a bidirectional block inside the last unit
    for layout, special in [({}, [0, 2]), ({"groups": groups}, [0, 2, 3]),
                            ({"positions": positions, "window": 4}, [0, 1, 2])]:
        masks = unit_masks(spans, units, roles, **layout)
        dense = attention_mask(units, roles, **layout)[0, 0]
        assert [i for i, m in enumerate(masks) if m is not None] == special, layout
        for (_, start, end), mask in zip(spans, masks, strict=True):
            block = dense[start:end, start:end]
            want = torch.ones_like(block).tril() if mask is None else mask[0, 0]
            assert torch.equal(block, want.bool()), (layout, start)


def test_a_placeholder_mask_without_its_unit_layout_is_refused():
    layout = unit_attention.UnitLayout(1, 4, [(0, 0, 4)])
    placeholder = layout.placeholder([None], "cpu")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="without its unit layout"):
        unit_attention.unit_sdpa(torch.nn.Module(), q, q, q, placeholder)
    other = unit_attention.UnitLayout(1, 4, [(0, 0, 4)])
    with pytest.raises(RuntimeError, match="not its layout's placeholder"):
        unit_attention.unit_sdpa(torch.nn.Module(), q, q, q, placeholder, unit_layout=other)


def test_units_fill_rows_and_pad_only_at_the_end():
    items = [_item(i, (1, IMG, 2), (3,) * (i + 1), (4, 4)) for i in range(4)]
    batch = PackedCollator(0, IMG, 12, prefix_sharing=False)(items)
    ids, mask = batch["input_ids"], attention_mask(batch["unit_ids"], batch["roles"])
    tokens, padding, images = batch["stats"].tokens, batch["stats"].padding, batch["stats"].images
    assert ids.shape[1] <= 12 and tokens + padding == ids.numel()
    # m twice and m' once per example (rows reorder units; the model tests check the placement)
    assert images == 12 and batch["images"]["pixel_values"][:, 0, 0, 0].sum() == 4
    assert ids.shape[0] > 1  # the step did not fit one row
    for row in ids.tolist():  # no real token is 0 here: padding (0) only after the last real token
        real = len(row) - row[::-1].index(next(t for t in row[::-1] if t != 0))
        assert 0 not in row[:real]
    assert mask.shape == (ids.shape[0], 1, ids.shape[1], ids.shape[1])
    with pytest.raises(ValueError, match="example 3 needs 7 tokens in one row, over max_tokens_per_batch=6"):
        PackedCollator(0, IMG, 6, prefix_sharing=False)(items)


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    model, processor = build_tiny_model()
    args = parse_config([], {"output_dir": str(tmp_path_factory.mktemp("o")), "use_cpu": True, "lora_r": 4,
                             "lora_alpha": 8, "report_to": "none"})
    policy, _ = prepare_model(model, args)
    randomize_lora(policy)
    dataset = prepare_dataset(args, processor, records=demo_records(n=6, seed=5), source="demo")
    return policy, processor, dataset


def _step(policy, processor, dataset, tmp_path, ref_logps=None, **layout):
    args = parse_config([], {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none", "lora_r": 4,
                             "lora_alpha": 8, "max_tokens_per_batch": 300, **layout})
    trainer = MDPOTrainer(policy, args, dataset, processor)
    items = [dataset[i] for i in range(len(dataset))]
    if ref_logps is not None:
        for item in items:
            item["ref_logps"] = ref_logps[item["example"].index]
    batch = trainer.data_collator(items)
    policy.zero_grad()
    loss, metrics = trainer.compute_loss(policy, batch, return_outputs=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    return loss.detach(), metrics, grads, trainer


LAYOUTS = [
    pytest.param({"packing": True, "prefix_sharing": True}, id="packed-shared-prefix"),
    pytest.param({"packing": True, "prefix_sharing": False}, id="packed-no-sharing"),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reference", ["live", "precomputed"])
def test_packed_equals_padded(lora_setup, tmp_path, layout, reference):
    policy, processor, dataset = lora_setup
    want_loss, want, want_grads, _ = _step(policy, processor, dataset, tmp_path / "a", packing=False)
    ref = None
    if reference == "precomputed":
        ref = _precomputed(policy, processor, dataset, tmp_path / "b", **layout)
        assert len(ref) == len(dataset)
    loss, got, grads, _ = _step(policy, processor, dataset, tmp_path / "c", ref_logps=ref, **layout)
    assert layout["packing"] and want["policy_logps"].shape == (6, 3)
    torch.testing.assert_close(got["policy_logps"], want["policy_logps"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["ref_logps"], want["ref_logps"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want["policy_logps"], want["ref_logps"])  # the adapters matter
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in ("rewards/chosen", "rewards/margins", "rewards/imageless_margins", "logps/imageless_chosen"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert grads.keys() == want_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def _precomputed(policy, processor, dataset, output_dir, **layout) -> dict:
    """The reference log-probs a trainer precomputes for (a view of) `dataset`."""
    _, _, _, trainer = _step(policy, processor, dataset.subset(dataset.examples), output_dir, **layout)
    trainer.precompute_reference()
    return trainer.train_dataset.ref_logps


def test_precompute_resumes_and_is_keyed_by_fingerprint(lora_setup, tmp_path, monkeypatch):
    policy, processor, dataset = lora_setup
    computed = []  # examples whose reference log-probs a pass computed (not read from the cache)

    def precompute(output_dir, **overrides):
        """A fresh trainer's precompute over a view of the set, as a rerun of the command does."""
        args = parse_config([], {"output_dir": str(output_dir), "use_cpu": True, "report_to": "none", "lora_r": 4,
                                 "lora_alpha": 8, "per_device_train_batch_size": 2, **overrides})
        trainer = MDPOTrainer(policy, args, dataset.subset(dataset.examples), processor)
        monkeypatch.setattr(trainer, "reference_logps", lambda batch, f=trainer.reference_logps: computed.append(
            len(batch["example_index"])) or f(batch))
        trainer.precompute_reference()
        return trainer.train_dataset.ref_logps

    full = precompute(tmp_path)
    cache = next((tmp_path / "ref_logps").iterdir())
    assert len(list(cache.glob("part-*.pt"))) == 3 and sum(computed) == 6

    interrupted = tmp_path / "interrupted"
    calls = []
    real_add = RefLogpStore.add

    def add_then_die(self, indices, logps):
        real_add(self, indices, logps)
        calls.append(len(indices))
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed after the first part
    monkeypatch.setattr(RefLogpStore, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        precompute(interrupted)
    monkeypatch.setattr(RefLogpStore, "add", real_add)
    computed.clear()
    resumed = precompute(interrupted)
    assert sum(computed) == 4  # only the four examples the first run did not finish
    for index, value in full.items():
        torch.testing.assert_close(resumed[index], value)
    computed.clear()
    precompute(interrupted)
    assert computed == []  # all read back

    precompute(interrupted, corruption_seed=1)  # other corrupted images: other numbers, another cache
    assert len(list((interrupted / "ref_logps").iterdir())) == 2 and sum(computed) == 6


@pytest.mark.slow
def test_demo_logs_the_same_metrics_packed_or_padded(tmp_path):
    from mdpo_fast.cli import DEMO_DEFAULTS, run_training
    from mdpo_fast.ops.loss import METRIC_NAMES

    logs = {}
    for name, layout in (("padded", {"packing": False, "precompute_ref_logps": False}), ("default", {})):
        model, processor = build_tiny_model()
        args = parse_config([], {**DEMO_DEFAULTS, "output_dir": str(tmp_path / name), "max_steps": 2,
                                 "logging_steps": 1, "disable_tqdm": True, "report_to": "none", **layout})
        trainer = run_training(args, model, processor, demo_records(n=64), source="demo")
        logs[name] = [e for e in trainer.state.log_history if "loss" in e and "rewards/chosen" in e]
    assert len(logs["padded"]) == len(logs["default"]) == 2
    for padded, default in zip(logs["padded"], logs["default"], strict=True):
        for name in ("loss", *METRIC_NAMES):
            assert default[name] == pytest.approx(padded[name], rel=1e-4, abs=1e-6), name
        assert default["tokens/model"] < padded["tokens/model"] / 2
        assert default["images/encoded"] == padded["images/encoded"] / 3  # m, m' once vs 3 rows x 2 forwards


def test_rows_are_balanced():
    from mdpo_fast.packing import balance_rows

    rows = balance_rows([700, 650, 600, 500, 400, 300, 200, 100], max_tokens=2000)
    loads = sorted(sum([700, 650, 600, 500, 400, 300, 200, 100][u] for u in row) for row in rows)
    assert len(rows) == 2 and loads == [1700, 1750]  # ceil(3450 / 2000) rows, near equal
    assert all(row == sorted(row) for row in rows)


def test_dense_rows_take_the_width_that_costs_least():
    """Under a dense mask a row of width W costs W (5d + W): short units stack into rows as wide as pays off,
    padding little; for a wide model, where attention is cheap next to the linear layers, padding is what costs."""
    import random

    from mdpo_fast.packing import balance_rows, pack_rows

    rng = random.Random(0)
    lengths = [rng.randint(220, 600) for _ in range(16)]

    def cost(rows, d):
        width = max(sum(lengths[u] for u in row) for row in rows)
        return len(rows) * width * (5 * d + width), 1 - sum(lengths) / (len(rows) * width)

    for d in (256, 4096):
        rows = pack_rows(lengths, 8192, dense_hidden_size=d)
        assert sorted(u for row in rows for u in row) == list(range(16))
        chosen, padding = cost(rows, d)
        for capacity in range(max(lengths), sum(lengths) + 1, 50):  # no capacity does better (to the 10% grid)
            assert chosen <= 1.1 * cost(balance_rows(lengths, capacity), d)[0]
        if d == 256:
            one_unit_rows = cost([[u] for u in range(16)], d)
            assert chosen < one_unit_rows[0] and padding < 0.15 < one_unit_rows[1]
        else:
            assert padding < 0.05
    assert pack_rows(lengths, 1000) == balance_rows(lengths, 1000)  # block-sparse attention: fewest rows


def test_packed_rows_put_far_fewer_tokens_through_the_model_than_padded_rows():
    """LLaVA-1.5 on RLAIF-V shapes (576 image tokens, prompts of 20-80 tokens, answers of 30-300), 8 examples a step:
    the packed layout's token positions (shared prefix, length-grouped steps, rows as SDPA's dense masks make them,
    tail padding counted) against 3B right-padded rows in random steps (`benchmarks/token_counts.py` compares with
    the published step itself)."""
    rng, image = random.Random(0), 7
    examples = [Example(i, None, (1,) * 5 + (image,) * 576 + (1,) * rng.randint(20, 80), (2,) * rng.randint(30, 300),
                        (3,) * rng.randint(30, 300)) for i in range(600)]
    dummy = {"pixel_values": torch.zeros(1, 1)}

    def positions(collate, order) -> int:
        steps = [order[start : start + 8] for start in range(0, len(order), 8)]
        return sum(collate([{"example": examples[i], "image": dummy, "corrupted_image": dummy} for i in step])
                   ["input_ids"].numel() for step in steps)

    packed_collate = PackedCollator(0, image, 8192, True, dense_hidden_size=4096)
    packed = positions(packed_collate, list(LengthGroupedSampler([packed_length(e) for e in examples], 8, 0)))
    padded = positions(PaddedCollator(0), random.Random(0).sample(range(600), 600))
    assert packed <= 0.7 * padded  # per forward: so also with a live reference in both
    precompute = positions(packed_collate, list(range(600)))  # one reference pass, in data order
    epochs = 3
    assert epochs * packed + precompute <= 0.5 * epochs * 2 * padded  # the default against policy + reference


def test_flex_attention_block_mask_matches_the_dense_mask(lora_setup, fresh_dynamo):
    # FlexAttention trains only on GPU (no CPU backward); its forward runs here, and must agree with SDPA.
    from mdpo_fast.modeling import image_features, packed_answer_tokens

    policy, processor, dataset = lora_setup
    batch = PackedCollator(0, processor.image_token_id, 4096)([dataset[i] for i in range(4)])
    base = policy.get_base_model()
    with torch.no_grad():
        features = image_features(policy, batch)
        dense = packed_answer_tokens(policy, batch, features).hidden
        base.set_attn_implementation("flex_attention")
        try:
            flex = packed_answer_tokens(policy, batch, features).hidden
        finally:
            base.set_attn_implementation("sdpa")
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


def test_flash_varlen_gets_one_flat_sequence_with_position_resets(lora_setup, monkeypatch):
    # flash-attn is not installable on CPU: check what our side hands to the model.
    import mdpo_fast.modeling as modeling

    policy, processor, dataset = lora_setup
    items = [dataset[i] for i in range(3)]
    batch = PackedCollator(0, processor.image_token_id, 120, prefix_sharing=False)(items)
    seen = {}

    def capture(model, inputs):
        seen.update(inputs)
        return torch.zeros(*inputs["input_ids"].shape, 128)

    monkeypatch.setattr(modeling, "last_hidden_states", capture)
    base = policy.get_base_model()
    monkeypatch.setattr(base.config.get_text_config(), "_attn_implementation", "flash_attention_2")
    hidden = modeling.packed_answer_tokens(policy, batch, modeling.image_features(policy, batch)).hidden
    rows, width = batch["input_ids"].shape
    assert rows > 1 and seen["attention_mask"] is None
    assert seen["input_ids"].shape == (1, rows * width)
    positions = seen["position_ids"][0]
    starts = (positions == 0).nonzero().squeeze(1).tolist()
    units = batch["unit_ids"].flatten()
    unit_starts = [0] + [i for i in range(1, len(units)) if units[i] != units[i - 1]]
    assert starts == unit_starts  # every unit (and every tail-padding token) starts a new sequence
    assert hidden.shape[0] == batch["target_ids"].shape[0]

    shared = PackedCollator(0, processor.image_token_id, 120)(items)
    with pytest.raises(ValueError, match="can express neither a shared prefix"):
        modeling.packed_answer_tokens(policy, shared, modeling.image_features(policy, shared))


def test_flash_with_prefix_sharing_is_refused_at_config_time():
    with pytest.raises(ValueError, match="prefix_sharing needs a mask flash-attn varlen cannot express"):
        parse_config([], {"output_dir": "o", "attn_implementation": "flash_attention_2"})


def test_an_example_over_the_row_budget_is_refused_before_training(lora_setup, tmp_path):
    from mdpo_fast.records import DataError

    policy, processor, dataset = lora_setup
    args = parse_config([], {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none",
                             "max_tokens_per_batch": 60})
    with pytest.raises(DataError) as err:
        MDPOTrainer(policy, args, dataset, processor)
    assert err.value.problems and all("over max_tokens_per_batch=60" in p for p in err.value.problems)
    assert err.value.problems[0].startswith(f"example {dataset.examples[0].index} needs ")
