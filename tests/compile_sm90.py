"""Compile every Triton kernel for sm_90 (H100) at its production tile sizes, on a machine without a GPU.

The interpreter proves the arithmetic; this proves the kernels pass Triton's and ptxas's checks at the
real block sizes, fit in shared memory and do not spill registers. Prints one JSON line per kernel.
Run with TRITON_INTERPRET unset: `python tests/compile_sm90.py`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget

from mdpo_fast.ops.kernels import linear_logprobs as lin
from mdpo_fast.ops.kernels import logits_logprobs as lgt
from mdpo_fast.ops.kernels.config import LINEAR_BWD, LINEAR_FWD, LOGITS, for_dtype

TARGET = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 227 * 1024
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out.stdout)}


def compile_one(kernel, types: dict, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    fn = kernel if isinstance(kernel, triton.JITFunction) else kernel.fn  # under @triton.heuristics
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    compiled = triton.compile(
        triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages},
    )
    return {"shared_bytes": compiled.metadata.shared, **_resources(compiled.asm["cubin"])}


# Arguments that change from batch to batch (rows of answer tokens, vocab blocks per program); sizes and strides of
# the model's hidden states and head are fixed per run.
PER_BATCH = ("n_rows", "blocks_per_split")
POINTEE = {"*fp32": torch.float32, "*bf16": torch.bfloat16, "*fp16": torch.float16, "*i64": torch.int64}


def length_variants(kernel, types: dict, constexprs: dict, lengths=(1, 2, 16, 37, 64, 1000, 4096)) -> int:
    """How many compiled variants launches at these batch lengths would need: the distinct keys Triton's own launch
    binder (what `kernel[grid](...)` looks its cache up by) gives them on sm_90."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = kernel if isinstance(kernel, triton.JITFunction) else kernel.fn
    binder = create_function_from_signature(fn.signature, fn.params, make_backend(TARGET))
    keys = set()
    for length in lengths:
        args = {}
        for name in fn.arg_names:
            if name in constexprs:
                args[name] = constexprs[name]
            elif name in PER_BATCH:
                args[name] = length
            elif types[name].startswith("*"):
                args[name] = torch.empty(16, dtype=POINTEE[types[name]])  # torch's allocations: 16-byte aligned
            else:
                args[name] = 1.0 if types[name].startswith("fp") else 4096
        keys.add(repr(binder(**args)[1]))
    return len(keys)


def linear_variants():
    ints = {"labels_ptr": "*i64", "rows_ptr": "*i64", "n_rows": "i32", "blocks_per_split": "i32", "H": "i32",
            "V": "i32", "stride_hn": "i64", "stride_wv": "i64", "softcap": "fp32"}
    fp32 = {"lse_part_ptr": "*fp32", "label_part_ptr": "*fp32", "lse_ptr": "*fp32", "grad_logps_ptr": "*fp32",
            "grad_hidden_ptr": "*fp32", "grad_weight_ptr": "*fp32", "grad_bias_ptr": "*fp32"}
    for dtype, ptr in DTYPES.items():
        for bias, softcap in ((False, False), (True, False), (False, True)):  # softcap: Gemma 2's final logits
            types = {**ints, **fp32, "hidden_ptr": ptr, "weight_ptr": ptr, "bias_ptr": ptr}
            base = {"HAS_BIAS": bias, "EMULATE_BF16": False, "DOT_PRECISION": "tf32", "SOFTCAP": softcap}
            if not bias:
                base["bias_ptr"] = None
            if not softcap:
                base["softcap"] = None
            variant = ("bias" if bias else "nobias") + ("-softcap" if softcap else "")
            cfg = for_dtype(LINEAR_FWD, TORCH_DTYPES[dtype])
            yield (f"linear_fwd-{dtype}-{variant}", lin._linear_logprobs_fwd_kernel, types,
                   {**base, "BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_H": cfg.block_h}, cfg)
            cfg = for_dtype(LINEAR_BWD, TORCH_DTYPES[dtype])
            for need in ("dh+dw", "dh"):  # full fine-tuning / LoRA (frozen LM head: no weight gradient)
                flags = {"HAS_DH": True, "HAS_DW": need == "dh+dw", "HAS_DB": bias and need == "dh+dw"}
                nones = {f"grad_{k}_ptr": None for k, on in (("weight", flags["HAS_DW"]), ("bias", flags["HAS_DB"]))
                         if not on}
                yield (f"linear_bwd-{dtype}-{variant}-{need}", lin._linear_logprobs_bwd_kernel,
                       types, {**base, **flags, **nones, "BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v,
                               "BLOCK_H": cfg.block_h, "GROUP_N": cfg.group_n}, cfg)
            tiles = {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_H": cfg.block_h}
            yield (f"linear_bwd_deterministic_hidden-{dtype}-{variant}", lin._linear_logprobs_bwd_hidden_kernel,
                   types, {**base, **tiles}, cfg)
            weight_flags = {"HAS_DW": True, "HAS_DB": bias, **({} if bias else {"grad_bias_ptr": None})}
            yield (f"linear_bwd_deterministic_weight-{dtype}-{variant}", lin._linear_logprobs_bwd_weight_kernel,
                   types, {**base, **weight_flags, **tiles}, cfg)


def logits_variants():
    ints = {"labels_ptr": "*i64", "V": "i32", "stride_n": "i64", "ignore_index": "i32", "logps_ptr": "*fp32",
            "lse_ptr": "*fp32", "grad_logps_ptr": "*fp32"}
    for dtype, ptr in DTYPES.items():
        types = {**ints, "logits_ptr": ptr, "grad_logits_ptr": ptr}
        yield f"logits_fwd-{dtype}", lgt._logits_logprobs_fwd_kernel, types, {"BLOCK_V": LOGITS.block_v}, LOGITS
        yield f"logits_bwd-{dtype}", lgt._logits_logprobs_bwd_kernel, types, \
            {"BLOCK_V": LOGITS.block_v, "EMULATE_BF16": False}, LOGITS


def main() -> None:
    for name, kernel, types, constexprs, cfg in (*linear_variants(), *logits_variants()):
        row = compile_one(kernel, types, constexprs, cfg.num_warps, getattr(cfg, "num_stages", 3))
        fn = kernel if isinstance(kernel, triton.JITFunction) else kernel.fn
        row["per_batch_args"] = [a for a in fn.arg_names if a in PER_BATCH]
        row["length_variants"] = length_variants(kernel, types, constexprs)
        print(json.dumps({"kernel": name, **row}), flush=True)


if __name__ == "__main__":
    main()
