"""mdpo-fast: mDPO preference training for vision-language models, with a fused log-prob loss."""

from mdpo_fast.ops.fused_loss import fused_linear_mdpo_loss
from mdpo_fast.ops.logprobs import linear_token_logprobs, segment_logps, token_logprobs
from mdpo_fast.ops.loss import METRIC_NAMES, mdpo_loss
from mdpo_fast.ops.module import MDPOLoss

__all__ = [
    "METRIC_NAMES",
    "MDPOConfig",
    "MDPOLoss",
    "MDPOTrainer",
    "fused_linear_mdpo_loss",
    "linear_token_logprobs",
    "mdpo_loss",
    "segment_logps",
    "token_logprobs",
]


def __getattr__(name: str):
    # The trainer pulls in transformers; loss-only users never pay for that import.
    if name == "MDPOConfig":
        from mdpo_fast.config import MDPOConfig

        return MDPOConfig
    if name == "MDPOTrainer":
        from mdpo_fast.trainer import MDPOTrainer

        return MDPOTrainer
    raise AttributeError(f"module 'mdpo_fast' has no attribute {name!r}")
