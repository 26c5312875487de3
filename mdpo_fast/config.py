"""Layer 6 (with `trainer.py` and `cli.py`): one configuration dataclass, read from flags and YAML by the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from mdpo_fast.corruption import AREA, RATIO, check_corruption
from mdpo_fast.modeling import DTYPES
from mdpo_fast.ops.loss import check_loss_options, num_branches


@dataclass
class MDPOConfig(TrainingArguments):
    """`transformers.TrainingArguments` plus the mDPO objective, data and LoRA settings."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local directory or hub id of an AutoModelForImageTextToText model."}
    )
    model_dtype: str = field(
        default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16."}
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "Attention backend: sdpa (packed rows unit by unit on CPU, dense masks on GPU), "
                  "flex_attention (block-sparse masks, long packed rows at no extra cost; needs a GPU to train), "
                  "flash_attention_2 (varlen; needs flash-attn and --prefix_sharing false) or eager."},
    )
    dataset: str | None = field(
        default=None, metadata={"help": "A .json / .jsonl file, a dataset saved with save_to_disk, or a hub id."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on (Hugging Face datasets)."})
    image_root: str | None = field(default=None, metadata={"help": "Directory that relative image paths are under."})
    eval_dataset: str | None = field(
        default=None, metadata={"help": "A held-out set to evaluate on, in any --dataset format (or use --eval_split)."}
    )
    eval_dataset_split: str = field(
        default="test", metadata={"help": "Split of --eval_dataset (Hugging Face datasets)."}
    )
    eval_split: float = field(
        default=0.0,
        metadata={"help": "Hold out this fraction of the training records (seeded by --seed, disjoint from training) "
                  "to evaluate on. With a held-out set, eval_strategy defaults to steps (every logging_steps)."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "A Jinja chat template, or a file holding one, replacing the processor's; needed only for "
                  "models whose processor has none and whose family documents no prompt format."},
    )
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Worker processes preparing the data set (decode, tokenize; once, then cached); default "
                  "every core. Sets of under 256 records are prepared in the main process."},
    )
    skip_bad_records: bool = field(
        default=False, metadata={"help": "Drop and count invalid records instead of stopping before training."}
    )
    max_length: int = field(
        default=2048,
        metadata={"help": "Prompt (with image tokens) + answer tokens. Answers are truncated to fit; a prompt "
                  "that does not fit is an error, never cut."},
    )
    beta: float = field(default=0.1, metadata={"help": "Reward scale: r = beta * (logp_policy - logp_reference)."})
    anchor: float = field(default=0.0, metadata={"help": "The chosen reward is anchored above this value."})
    loss_weights: list[float] = field(
        default_factory=lambda: [1.0, 1.0, 1.0],
        metadata={"help": "Weights of (DPO, image-conditional, anchor) terms; 1 0 0 is plain DPO."},
    )
    imageless_metrics: bool = field(
        default=False,
        metadata={"help": "Build the corrupted-image branch even when the image-conditional weight is 0 (plain "
                  "DPO), for its rewards/imageless_* metrics: one more image encode, prompt and chosen answer per "
                  "example (1.7x plain DPO's tokens per step at LLaVA-1.5 proportions). Without it the branch "
                  "costs nothing."},
    )
    corruption_area: list[float] = field(
        default_factory=lambda: list(AREA), metadata={"help": "Range of the image area the corrupting crop keeps."}
    )
    corruption_ratio: list[float] = field(
        default_factory=lambda: list(RATIO), metadata={"help": "Range of the crop's aspect ratio (log-uniform)."}
    )
    corruption_seed: int | None = field(
        default=None, metadata={"help": "Seed of the corrupted images; defaults to --seed."}
    )
    use_lora: bool = field(
        default=True,
        metadata={"help": "LoRA on every linear layer of the language model, reference = adapters off. "
                  "false: full fine-tuning of the language model with a frozen reference copy (2x weights)."},
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "LoRA dropout; above 0 the policy differs from the reference at step 0."}
    )
    packing: bool = field(
        default=True,
        metadata={"help": "Lay the three branches of the step's examples back to back in rows, no padding "
                  "inside a row; false: the plain padded layout (3B padded rows, images re-encoded per row)."},
    )
    prefix_sharing: bool = field(
        default=True,
        metadata={"help": "With packing, chosen and rejected share one copy of the image+prompt prefix."},
    )
    max_tokens_per_batch: int = field(
        default=8192,
        metadata={"help": "With packing, the most tokens in one row; a step needing more fills several rows. "
                  "With dense attention masks (sdpa on GPU, eager) rows are as wide as costs least, weighing the "
                  "padding of short rows against the masked-out attention work of long ones."},
    )
    packed_attention: str = field(
        default="auto",
        metadata={"help": "With packing and sdpa: units (one SDPA call per unit: no mask between units is built or "
                  "computed), dense (one mask per row), or auto (units on CPU; dense on GPU until units are measured "
                  "there)."},
    )
    precompute_ref_logps: bool = field(
        default=True,
        metadata={"help": "Compute the reference log-probs of every example once before training (kept in "
                  "output_dir/ref_logps, reused on resume) instead of a reference forward every step."},
    )
    dataloader_num_workers: int = field(
        default_factory=lambda: min(8, max(1, (os.cpu_count() or 2) - 1)),
        metadata={"help": "Loader worker processes, which read, decode, corrupt and process the images while the "
                  "model steps; default: up to 8, leaving a core to the training process. 0: in the main process."},
    )
    dataloader_persistent_workers: bool = field(
        default=True, metadata={"help": "Keep the loader workers between epochs (no restart cost)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept false: the collator needs the whole example."}
    )

    @property
    def num_branches(self) -> int:
        """Branches built per example: 3, or 2 (chosen, rejected) when the corrupted-image one is not needed."""
        return num_branches(self.loss_weights, self.imageless_metrics)

    def __post_init__(self):
        if self.eval_dataset and self.eval_split:
            raise ValueError("give --eval_dataset or --eval_split, not both")
        if self.eval_dataset and (self.eval_dataset, self.eval_dataset_split) == (self.dataset, self.dataset_split):
            raise ValueError("--eval_dataset is the training set itself: give a held-out set, or --eval_split")
        if not 0 <= self.eval_split < 1:
            raise ValueError(f"eval_split must lie in [0, 1), got {self.eval_split}")
        if (self.eval_dataset or self.eval_split) and self.eval_strategy in ("no", None):
            self.eval_strategy = "steps"  # a held-out set is there to be evaluated
        super().__post_init__()
        self.loss_weights = list(check_loss_options(self.beta, self.loss_weights))
        check_corruption(self.corruption_area, self.corruption_ratio)
        if self.packing and self.prefix_sharing and self.attn_implementation.startswith("flash_attention"):
            raise ValueError("prefix_sharing needs a mask flash-attn varlen cannot express: use --prefix_sharing "
                             "false with flash_attention_2, or --attn_implementation flex_attention")
        if self.packed_attention not in ("auto", "units", "dense"):
            raise ValueError(f"packed_attention must be auto, units or dense, got {self.packed_attention!r}")
        if self.packing and self.packed_attention == "units" and self.attn_implementation != "sdpa":
            raise ValueError("--packed_attention units runs SDPA unit by unit: it needs --attn_implementation sdpa")
        if self.max_tokens_per_batch < 2:
            raise ValueError(f"max_tokens_per_batch must be at least 2, got {self.max_tokens_per_batch}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.model_dtype not in DTYPES:
            raise ValueError(f"model_dtype must be one of {', '.join(DTYPES)}, got {self.model_dtype!r}")
        if self.corruption_seed is None:
            self.corruption_seed = self.seed
        if self.dataset_num_proc is None:
            self.dataset_num_proc = os.cpu_count() or 1
        if self.dataloader_num_workers == 0:  # the Trainer refuses these without workers
            self.dataloader_persistent_workers = False
            self.dataloader_prefetch_factor = None
        elif self.dataloader_prefetch_factor is None:
            self.dataloader_prefetch_factor = 4  # batches ready per worker: a slow image never stalls a step
