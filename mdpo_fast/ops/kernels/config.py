"""Launch settings for every kernel, in one place: a fixed config per op, no autotuning.

The GPU configs are shaped for H100-class parts (228 KiB shared memory, 132 SMs) and bf16 inputs; they are
starting points picked from the tile shapes that dense Triton matmuls use, not the result of a sweep. The
`*_INTERPRET` configs are small so that `TRITON_INTERPRET=1` runs on CPU tensors finish quickly and the
tests cross several vocab, hidden and row blocks even at tiny shapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton


@dataclass(frozen=True)
class LinearLogprobsConfig:
    """Tiles of the fused `hidden @ weight.T -> log-prob` kernels. `tl.dot` needs every block >= 16."""

    block_n: int  # rows (tokens) per program
    block_v: int  # vocab entries per logit tile
    block_h: int  # hidden features per step of the on-chip matmul
    num_warps: int
    num_stages: int
    group_n: int = 8  # backward: row blocks that walk the vocab together, so their weight tiles share L2
    # Forward: split the vocab across programs until the grid has at least this many; 0 = two per SM.
    min_programs: int = 0


@dataclass(frozen=True)
class LogitsLogprobsConfig:
    """Tiles of the log-softmax + gather kernels over an existing `[N, V]` logits tensor."""

    block_v: int
    num_warps: int


# block_h=32: at 64 the sm_90 build spills registers (255 per thread, 168-184 bytes of stack, as
# tests/compile_sm90.py reports); at 32 neither kernel spills. Not yet timed on a GPU.
LINEAR_FWD = LinearLogprobsConfig(block_n=128, block_v=128, block_h=32, num_warps=8, num_stages=3)
# Backward holds the logit tile plus two dot outputs per step, so it takes half the rows.
LINEAR_BWD = LinearLogprobsConfig(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=3, group_n=8)
LOGITS = LogitsLogprobsConfig(block_v=4096, num_warps=8)  # forward and backward alike

_SMALL = {"block_n": 16, "block_v": 64, "block_h": 32, "num_warps": 1, "num_stages": 1}
LINEAR_FWD_INTERPRET = LinearLogprobsConfig(**_SMALL, min_programs=4)  # 4: the tests split the vocab too
LINEAR_BWD_INTERPRET = LinearLogprobsConfig(**_SMALL, group_n=2)
LOGITS_INTERPRET = LogitsLogprobsConfig(block_v=128, num_warps=1)


def interpreting(device: torch.device) -> bool:
    """True when kernels run in Triton's interpreter (`TRITON_INTERPRET=1`), the only way CPU tensors reach them."""
    if device.type == "cpu" or triton.knobs.runtime.interpret:
        check_interpreter()
        return True
    return False


@functools.cache
def check_interpreter() -> None:
    """Triton 3.6's interpreter turns a loop bound that is a kernel argument into an int through a 1-element
    array, which numpy >= 2.4 refuses: every kernel with such a loop fails mid-launch with a numpy TypeError.
    Compiled kernels (GPU) are not affected. One clear line instead."""
    import numpy as np

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())

    if version(triton.__version__) <= (3, 6) and version(np.__version__) >= (2, 4):
        raise RuntimeError(f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run with numpy "
                           f"{np.__version__}: install numpy<2.4 beside it, or a newer Triton")


def emulate_bf16(x: torch.Tensor) -> bool:
    """The interpreter has no bf16 arithmetic (it stores bf16 as raw uint16): its `tl.dot` multiplies the bit
    patterns (triton-lang/triton#11584) and its fp32 -> bf16 cast truncates. Kernels then take bf16 dot operands
    through fp32 (exact) and round to bf16 by hand, so they compute what the GPU computes."""
    return x.dtype == torch.bfloat16 and interpreting(x.device)


def _block(size: int, cap: int) -> int:
    # Never wider than the (power-of-two rounded) dimension; hidden and vocab sizes are fixed per model,
    # so clamping on them costs no recompiles.
    return min(cap, max(16, triton.next_power_of_2(size)))


def for_dtype(cfg: LinearLogprobsConfig, dtype: torch.dtype) -> LinearLogprobsConfig:
    """fp32 operands take twice the shared memory and registers of 16-bit ones: half the hidden block (the
    fp32 backward at block_h=64 needed 240 KiB of shared memory, over H100's 227 KiB; tests/compile_sm90.py)."""
    return replace(cfg, block_h=cfg.block_h // 2) if dtype == torch.float32 else cfg


def linear_fwd_config(device: torch.device, dtype: torch.dtype, hidden_size: int, vocab_size: int):
    cfg = LINEAR_FWD_INTERPRET if interpreting(device) else for_dtype(LINEAR_FWD, dtype)
    return _clamp_linear(cfg, hidden_size, vocab_size)


def linear_bwd_config(device: torch.device, dtype: torch.dtype, hidden_size: int, vocab_size: int):
    cfg = LINEAR_BWD_INTERPRET if interpreting(device) else for_dtype(LINEAR_BWD, dtype)
    return _clamp_linear(cfg, hidden_size, vocab_size)


def _clamp_linear(cfg: LinearLogprobsConfig, hidden_size: int, vocab_size: int) -> LinearLogprobsConfig:
    return replace(cfg, block_v=_block(vocab_size, cfg.block_v), block_h=_block(hidden_size, cfg.block_h))


def logits_config(device: torch.device, vocab_size: int) -> LogitsLogprobsConfig:
    cfg = LOGITS_INTERPRET if interpreting(device) else LOGITS
    return replace(cfg, block_v=_block(vocab_size, cfg.block_v))


@functools.lru_cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def min_programs(cfg: LinearLogprobsConfig, device: torch.device) -> int:
    if cfg.min_programs or interpreting(device):
        return max(1, cfg.min_programs)
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


class VocabSplits(NamedTuple):
    splits: int  # programs per row block, each over its own slice of the vocab
    per_split: int  # vocab blocks per slice


def vocab_splits(n_row_blocks: int, n_vocab_blocks: int, target_programs: int) -> VocabSplits:
    """`VocabSplits` such that `n_row_blocks * splits >= target_programs` where the vocab allows.

    Few answer tokens give few row blocks; splitting the vocab keeps every SM busy. Every split is non-empty.
    """
    splits = min(n_vocab_blocks, max(1, triton.cdiv(target_programs, n_row_blocks)))
    per_split = triton.cdiv(n_vocab_blocks, splits)
    return VocabSplits(triton.cdiv(n_vocab_blocks, per_split), per_split)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow PyTorch's own matmul setting, so the kernel is no less exact than `hidden @ weight.T`."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored by `tl.dot` for 16-bit inputs
