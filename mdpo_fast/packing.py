"""Layer 3 (fast path): the three branches of a batch packed back to back, with no padding inside a row.

With prefix sharing an example becomes two units:
    [prefix(m)][chosen][rejected]     rejected attends to the prefix and itself, never to chosen;
                                      its positions continue from the end of the prefix
    [prefix(m')][chosen]              the corrupted-image branch
Without it, three units `[prefix(m)][chosen]`, `[prefix(m)][rejected]`, `[prefix(m')][chosen]`. Units
fill rows of at most `max_tokens_per_batch` tokens, balanced so rows are near equal; rows are padded
only at their ends to stack.

Every answer token gets the flat index of the hidden state that predicts it (the previous token of
its own sequence, which for the first rejected token is the last prefix token, not the row's
previous token), its id, and its segment id `3 * example + branch`, as the fused loss takes them.
The batch's image inputs follow the image placeholders in row-major order, as the model's own forward
places features; with prefix sharing each image appears once.

Attention beyond causality comes from per-token descriptors the mask is built from on the device:
the unit, the role inside it, the 1-D position (sliding windows count distance in positions, so a
rejected answer sees the prefix as in its own sequence) and the family's bidirectional groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from mdpo_fast.collate import BatchStats, concat_image_inputs
from mdpo_fast.families.base import Family
from mdpo_fast.families.mrope import RopePositions
from mdpo_fast.ops.loss import CHOSEN, CORRUPTED, NUM_BRANCHES, REJECTED

if TYPE_CHECKING:
    from mdpo_fast.unit_attention import Span

# Role of a token inside its unit, for the one attention rule beyond causality.
PREFIX, FIRST_ANSWER, SECOND_ANSWER = 0, 1, 2


class Unit(NamedTuple):
    """One sequence of the packed layout: an example's image + prompt prefix and the answers that follow it, each
    `(answer_ids, branch)`; `image` names the item entry ("image" or "corrupted_image") its placeholders show."""

    prefix: Sequence[int]
    image: str
    answers: list[tuple[Sequence[int], int]]

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(answer) for answer, _ in self.answers)


def example_units(ex, prefix_sharing: bool, num_branches: int = NUM_BRANCHES) -> list[Unit]:
    """The example's units: chosen, then rejected with `num_branches` >= 2 (after chosen in one unit with a shared
    prefix) and the corrupted-image unit with 3."""
    if num_branches == 1:
        units = [Unit(ex.prompt_ids, "image", [(ex.chosen_ids, CHOSEN)])]
    elif prefix_sharing:
        units = [Unit(ex.prompt_ids, "image", [(ex.chosen_ids, CHOSEN), (ex.rejected_ids, REJECTED)])]
    else:
        units = [Unit(ex.prompt_ids, "image", [(ex.chosen_ids, CHOSEN)]),
                 Unit(ex.prompt_ids, "image", [(ex.rejected_ids, REJECTED)])]
    if num_branches > CORRUPTED:
        units.append(Unit(ex.prompt_ids, "corrupted_image", [(ex.chosen_ids, CORRUPTED)]))
    return units


def packed_length(ex, prefix_sharing: bool = True, num_branches: int = NUM_BRANCHES) -> int:
    """Tokens the example puts through the model in the packed layout."""
    return sum(unit.length for unit in example_units(ex, prefix_sharing, num_branches))


def rows_too_long(examples, max_tokens: int, prefix_sharing: bool, num_branches: int) -> list[str]:
    """One line per example whose longest unit cannot fit a row of `max_tokens` tokens."""
    problems = []
    for ex in examples:
        need = max(unit.length for unit in example_units(ex, prefix_sharing, num_branches))
        if need > max_tokens:
            problems.append(f"example {ex.index} needs {need} tokens in one row, over max_tokens_per_batch="
                            f"{max_tokens}; raise max_tokens_per_batch or lower max_length")
    return problems


def mask_rule(units: torch.Tensor, roles: torch.Tensor, positions: torch.Tensor | None = None,
              groups: torch.Tensor | None = None, window: int | None = None, window_limits_groups: bool = False):
    """`rule(b, h, q, kv)` -> True where query q of row b may attend key kv: same unit, never from the second
    answer of a unit to the first one (rejected does not see chosen), and kv <= q or q and kv in one
    bidirectional group (`groups` >= 0). For a sliding-window layer also q - kv < `window` in positions: on the
    causal part only, or on groups too with `window_limits_groups` (the two ways families compose them).
    The indices may be scalars (FlexAttention) or broadcasting index tensors (a dense mask)."""

    def rule(b, h, q, kv):
        allowed = kv <= q
        in_window = None if window is None else positions[b, q] - positions[b, kv] < window
        if in_window is not None and not window_limits_groups:
            allowed = allowed & in_window
        if groups is not None:
            allowed = allowed | ((groups[b, q] == groups[b, kv]) & (groups[b, q] >= 0))
        if in_window is not None and window_limits_groups:
            allowed = allowed & in_window
        crossing = (roles[b, q] == SECOND_ANSWER) & (roles[b, kv] == FIRST_ANSWER)
        return (units[b, q] == units[b, kv]) & allowed & ~crossing

    return rule


def attention_mask(units: torch.Tensor, roles: torch.Tensor, **layout) -> torch.Tensor:
    """`[R, 1, L, L]` bool, True where query i may attend key j: `mask_rule` evaluated densely."""
    rows, length = units.shape
    index = torch.arange(length, device=units.device)
    b = torch.arange(rows, device=units.device)[:, None, None]
    return mask_rule(units, roles, **layout)(b, None, index[None, :, None], index[None, None, :])[:, None]


def unit_masks(spans: list[Span], units: torch.Tensor, roles: torch.Tensor,
               positions: torch.Tensor | None = None, groups: torch.Tensor | None = None, window: int | None = None,
               window_limits_groups: bool = False) -> list[torch.Tensor | None]:
    """Per `unit_attention.Span` of one unit: `mask_rule` over the unit's own tokens as a `[1, 1, U, U]` bool
    mask, or None where that is plain causal attention (no second answer, no bidirectional group, every pair of
    its tokens within the window)."""
    rule = mask_rule(units, roles, positions, groups, window, window_limits_groups)
    masks = []
    for r, start, end in spans:
        special = (roles[r, start:end] == SECOND_ANSWER).any()
        if groups is not None:
            special |= (groups[r, start:end] >= 0).any()
        if window is not None:
            span_positions = positions[r, start:end]
            special |= span_positions.max() - span_positions.min() >= window
        if not special:
            masks.append(None)
            continue
        index = torch.arange(start, end, device=units.device)
        masks.append(rule(r, None, index[:, None], index[None, :])[None, None])
    return masks


def balance_rows(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Unit indices per row: as few rows as the budget allows, units longest first into the shortest row
    with room (a new row when none has), so rows come out nearly equal and stacking them pads little.
    """
    n_rows = -(-sum(lengths) // max_tokens)
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    used = [0] * n_rows
    for u in sorted(range(len(lengths)), key=lambda u: -lengths[u]):
        fits = [r for r in range(len(rows)) if used[r] + lengths[u] <= max_tokens]
        if not fits:
            rows.append([])
            used.append(0)
            fits = [len(rows) - 1]
        r = min(fits, key=lambda r: used[r])
        rows[r].append(u)
        used[r] += lengths[u]
    return [sorted(row) for row in rows]  # units keep their batch order within a row


def pack_rows(lengths: list[int], max_tokens: int, dense_hidden_size: int | None = None) -> list[list[int]]:
    """Unit indices per row (`balance_rows`). With block-sparse attention (`dense_hidden_size` None) as few rows as
    `max_tokens` allows. A dense mask costs every masked-out entry: stacked to width W, each row costs about
    W * (5 d + W) per layer (the linear layers about 20 d^2 FLOPs per token, dense attention 4 W d), so the row
    capacity is the one, from the longest unit up to `max_tokens`, whose rows cost least; it trades the padding
    that stacking short rows leaves against the attention that long rows waste."""
    if dense_hidden_size is None:
        return balance_rows(lengths, max_tokens)
    best, capacity, total = None, max(lengths), sum(lengths)
    while True:
        rows = balance_rows(lengths, capacity)
        width = max(sum(lengths[u] for u in row) for row in rows)
        cost = len(rows) * width * (5 * dense_hidden_size + width)
        if best is None or cost < best[0]:
            best = (cost, rows)
        if capacity >= min(max_tokens, total):
            return best[1]
        capacity = min(capacity + max(1, capacity // 10), max_tokens, total)  # 10% steps


def block_mask(units: torch.Tensor, roles: torch.Tensor, **layout):
    """The same `mask_rule` as `attention_mask`, as a FlexAttention `BlockMask`: fully masked blocks are skipped,
    so long rows cost no wasted attention."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = units.shape
    return create_block_mask(mask_rule(units, roles, **layout), rows, None, length, length, device=units.device)


class PlannedUnit(NamedTuple):
    """A unit in a step's plan: its number (its tokens' unit id), the item it belongs to, the unit."""

    number: int
    example_no: int
    unit: Unit


@dataclass
class _Row:
    """One packed row as it is filled: per token its id, 1-D position, unit and role (M-RoPE positions in pieces),
    and per answer token the column predicting it, its id and its segment."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    rope: list[torch.Tensor] = field(default_factory=list)  # [axes, n] pieces, for M-RoPE models
    units: list[int] = field(default_factory=list)
    roles: list[int] = field(default_factory=list)
    predictors: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)

    def place(self, planned: PlannedUnit, rope: RopePositions | None) -> None:
        """Append a unit: its prefix, then each answer positioned right after the prefix (`rope`: the family's
        multi-axis positions of the prefix, or None)."""
        prefix, _, answers = planned.unit
        start = len(self.ids)
        self.ids += prefix
        self.positions += range(len(prefix))
        self.roles += [PREFIX] * len(prefix)
        if rope is not None:
            self.rope.append(rope.positions)
        for k, (answer, branch) in enumerate(answers):
            col = len(self.ids)
            self.ids += answer
            self.positions += range(len(prefix), len(prefix) + len(answer))
            if rope is not None:
                self.rope.append(torch.arange(rope.next, rope.next + len(answer)).expand(len(rope.positions), -1))
            self.roles += [FIRST_ANSWER if k == 0 else SECOND_ANSWER] * len(answer)
            # token j of the answer is predicted by token j-1, the first one by the prefix's last token
            self.predictors += [start + len(prefix) - 1] + [col + j for j in range(len(answer) - 1)]
            self.targets += answer
            self.segments += [NUM_BRANCHES * planned.example_no + branch] * len(answer)
        self.units += [planned.number] * (len(self.ids) - start)


class PackedCollator:
    """Packs a step's examples (their first `num_branches` branches) into rows of at most `max_tokens_per_batch`
    tokens. With `dense_hidden_size` (the decoder's width, for SDPA or eager attention with a dense mask) the rows
    are as wide as costs least (`pack_rows`). `family` and `config` (the model's adapter and config) add what
    the family needs: multi-axis positions (`rope_position_ids [axes, R, L]`, each unit's own, answers
    continuing from its prefix), bidirectional `groups [R, L]` and per-token `text_inputs`."""

    def __init__(self, pad_token_id: int, image_token_id: int, max_tokens_per_batch: int,
                 prefix_sharing: bool = True, dense_hidden_size: int | None = None,
                 family: Family | None = None, config=None, num_branches: int = NUM_BRANCHES):
        self.num_branches = num_branches
        self.pad_token_id = pad_token_id
        self.image_token_id = image_token_id
        self.max_tokens = max_tokens_per_batch
        self.prefix_sharing = prefix_sharing
        self.dense_hidden_size = dense_hidden_size
        self.family, self.config = family or Family(), config

    def __call__(self, items: list[dict]) -> dict:
        problems = rows_too_long([item["example"] for item in items], self.max_tokens, self.prefix_sharing,
                                 self.num_branches)
        if problems:
            raise ValueError("; ".join(problems))
        rows, images = [], []  # images: the inputs of every unit with image placeholders, in row-major order
        for row_plan in self.plan(items):
            row = _Row()
            for planned in row_plan:
                image = items[planned.example_no][planned.unit.image]
                if self.image_token_id in planned.unit.prefix:
                    images.append(image)
                row.place(planned, self.family.rope_positions(planned.unit.prefix, image, self.config))
            rows.append(row)
        batch = self._stack(rows)
        answer_mask = (batch["roles"] != PREFIX) & (batch["unit_ids"] >= 0)
        batch["example_index"] = torch.tensor([item["example"].index for item in items])
        real = sum(len(row.ids) for row in rows)
        batch["stats"] = BatchStats(real, batch["input_ids"].numel() - real, len(images))
        batch["text_inputs"] = self.family.text_inputs(batch["input_ids"], answer_mask, self.config)
        batch["images"] = concat_image_inputs(images) if images else {}
        groups = self.family.bidirectional_groups(batch["input_ids"], answer_mask, self.config)
        if groups is not None:
            batch["groups"] = groups
        if "ref_logps" in items[0]:
            batch["ref_logps"] = torch.stack([item["ref_logps"] for item in items])
        return batch

    def plan(self, items: list[dict]) -> list[list[PlannedUnit]]:
        """The step's units, numbered, assigned to rows (`pack_rows`)."""
        units = [(k, unit) for k, item in enumerate(items)
                 for unit in example_units(item["example"], self.prefix_sharing, self.num_branches)]
        assignment = pack_rows([unit.length for _, unit in units], self.max_tokens, self.dense_hidden_size)
        return [[PlannedUnit(u, *units[u]) for u in row] for row in assignment]

    def _stack(self, rows: list[_Row]) -> dict:
        """The rows as `[R, L]` tensors (padded at their ends), and the answer tokens' flat predictor indices,
        targets and segment ids in row-major order."""
        width = max(len(row.ids) for row in rows)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        position_ids, roles = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
        unit_ids = -1 - torch.arange(len(rows) * width).view(shape)  # padding: a unit of its own
        axes = rows[0].rope[0].shape[0] if rows[0].rope else 0
        rope = torch.zeros((axes, *shape), dtype=torch.long) if axes else None
        for r, row in enumerate(rows):
            n = len(row.ids)
            input_ids[r, :n] = torch.tensor(row.ids)
            position_ids[r, :n] = torch.tensor(row.positions)
            unit_ids[r, :n] = torch.tensor(row.units)
            roles[r, :n] = torch.tensor(row.roles)
            if rope is not None:
                rope[:, r, :n] = torch.cat(row.rope, dim=1)
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "unit_ids": unit_ids,  # with roles, positions and groups: the attention layout, a mask on the device
            "roles": roles,
            "predictor_index": torch.tensor([r * width + c for r, row in enumerate(rows) for c in row.predictors]),
            "target_ids": torch.tensor([t for row in rows for t in row.targets]),
            "segment_ids": torch.tensor([s for row in rows for s in row.segments]),
        }
        if rope is not None:
            batch["rope_position_ids"] = rope
        return batch
