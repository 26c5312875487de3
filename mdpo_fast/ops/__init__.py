"""Layer 5, the loss library: the mDPO objective, per-token log-probs straight from hidden states and the LM-head weight
(Triton kernels on GPU, a chunked PyTorch path elsewhere, plain references), and the fused three-branch loss.
It imports nothing of the trainer, the data layers, transformers or peft (tests/test_imports.py)."""

from mdpo_fast.ops.fused_loss import fused_linear_mdpo_loss
from mdpo_fast.ops.logprobs import linear_token_logprobs, segment_logps, token_logprobs
from mdpo_fast.ops.loss import METRIC_NAMES, mdpo_loss
from mdpo_fast.ops.module import MDPOLoss

__all__ = [
    "METRIC_NAMES",
    "MDPOLoss",
    "fused_linear_mdpo_loss",
    "linear_token_logprobs",
    "mdpo_loss",
    "segment_logps",
    "token_logprobs",
]
