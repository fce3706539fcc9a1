"""TrainConfig: every setting of a training run, one frozen dataclass (flags: `config.py`).

The default reproduces the README's main job (`python train.py`): the `digits` SepViT on
scikit-learn's 8x8 digits upsampled to 56x56, 8 epochs of batch 32, test accuracy >= 0.98.
Every option added since defaults to off.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from sepvit_jax.core.config import CONFIGS
from sepvit_jax.data import DataConfig
from sepvit_jax.train import recipes
from sepvit_jax.train.errors import ConfigError
from sepvit_jax.train.optim import OptimConfig

# Settings that only steer this invocation (or this process) and are not saved with the run.
TRANSIENT = (
    "resume",
    "eval_only",
    "stop_at_step",
    "config",
    "compile_cache",
    "coordinator_address",
    "num_processes",
    "process_id",
)

# Compute dtypes of a run (parameters are always float32).
COMPUTE_DTYPES = ("float32", "bfloat16")
# The side of the images when neither a flag, a recipe nor --init-from's record gives one.
DEFAULT_IMAGE_SIZE = 56


def _setting(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of one run; each field is the flag `--field-name` (see `python train.py -h`)."""

    # ---- model and data ----
    recipe: str | None = _setting(
        None, f"a named recipe ({', '.join(recipes.RECIPES)}; what each sets: see below)"
    )
    model: str = _setting(
        "digits",
        "a named variant (" + ", ".join(CONFIGS) + "), optionally with overrides "
        "('digits,dim=48,depth=2-2'; tuples with '-'), or sizes alone "
        "('dim=32,depth=1-1,heads=1-2'), or a JSON object; num_classes and channels come "
        "from the data",
    )
    drop_path_rate: float = _setting(
        0.0, "stochastic depth: drop probability of the last block (timm's linear schedule)"
    )
    remat: bool = _setting(False, "recompute each block in the backward pass (less memory)")
    data: str = _setting("digits", "digits | imagefolder | synthetic")
    data_dir: str | None = _setting(None, "imagefolder root holding train/CLASS/* and val/CLASS/*")
    image_size: int | None = _setting(
        None,
        f"side of the square images the model sees (default: --init-from's recorded size, "
        f"else {DEFAULT_IMAGE_SIZE})",
    )
    num_workers: int = _setting(0, "Grain worker processes (0: read in this process)")
    prefetch: int = _setting(2, "batches read ahead (per worker)")
    max_bad_fraction: float = _setting(
        0.01, "abort once more than this fraction of an imagefolder split is unreadable"
    )
    # ---- augmentation ----
    randaugment: str | None = _setting(
        None, "imagefolder: timm RandAugment of the training images, e.g. rand-m9-mstd0.5-inc1"
    )
    random_erasing: float = _setting(0.0, "imagefolder: probability of random erasing (pixels)")
    repeated_aug: int = _setting(1, "imagefolder: DeiT's repeated augmentation count (1: off)")
    mixup: float = _setting(0.0, "mixup alpha (0: off); soft targets, label smoothing folded in")
    cutmix: float = _setting(0.0, "cutmix alpha (0: off)")
    mixup_switch_prob: float = _setting(
        0.5, "chance of cutmix instead of mixup for a batch when both are on"
    )
    # ---- optimisation ----
    batch_size: int = _setting(32, "global batch: all devices and processes together")
    epochs: int = _setting(8, "length of the run in epochs")
    steps: int | None = _setting(None, "length of the run in steps (overrides --epochs)")
    lr: float = _setting(2e-3, "peak learning rate of AdamW")
    warmup_steps: int = _setting(-1, "linear warm-up steps (-1: --warmup-epochs), then cosine")
    warmup_epochs: float = _setting(1.0, "linear warm-up in epochs, when --warmup-steps is -1")
    warmup_lr: float = _setting(0.0, "learning rate the warm-up starts from")
    weight_decay: float = _setting(
        0.05, "AdamW decoupled weight decay (not on norms, biases, window tokens)"
    )
    clip_norm: float = _setting(1.0, "global gradient-norm clip (0: off)")
    label_smoothing: float = _setting(0.1, "label smoothing of the training loss")
    min_lr_ratio: float = _setting(0.0, "final learning rate as a fraction of --lr")
    min_lr: float | None = _setting(None, "final learning rate (overrides --min-lr-ratio)")
    grad_accum: int = _setting(1, "micro-batches per step (gradients averaged)")
    ema_decay: float = _setting(
        0.0,
        "keep an exponential moving average of the parameters with this decay per step (0: "
        "off); evaluated beside them, the better one is exported",
    )
    dtype: str = _setting(
        "float32", f"compute dtype: {' | '.join(COMPUTE_DTYPES)} (parameters float32)"
    )
    # ---- devices ----
    mesh: str = _setting("data=-1,fsdp=1", "device mesh axes (-1: the remaining devices)")
    seed: int = _setting(0, "seed of the initialisation, dropout, mixing and data order")
    compile_cache: str = _setting(
        "auto",
        "persistent XLA compilation cache: a directory, 'none', or 'auto' (the default: "
        "$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/sepvit_jax/xla or "
        "~/.cache/sepvit_jax/xla)",
    )
    # ---- run directory and checkpoints ----
    runs_dir: str = _setting("runs", "where run directories go")
    run_name: str | None = _setting(
        None, "the run directory's name (default: the data's name, the date and the time)"
    )
    checkpoint_every: int = _setting(
        0, "steps between checkpoints (0: at epoch ends, at least a minute apart)"
    )
    keep: int = _setting(2, "checkpoints kept: the last N, plus the best N by test accuracy")
    log_every: int = _setting(
        0, "steps between logged training metrics (0: every epoch, at most 100 steps apart)"
    )
    init_from: str | None = _setting(
        None, "start from a `convert torch2flax` (or `sepvit_jax.save`) directory"
    )
    eval_only: bool = _setting(False, "evaluate --run-name's latest checkpoint (or --init-from)")
    resume: bool = _setting(False, "continue --run-name from its latest checkpoint, exactly")
    stop_at_step: int | None = _setting(
        None, "stop and checkpoint at this step; the schedule is unchanged"
    )
    # ---- several hosts (otherwise read from the cluster's environment, if any) ----
    coordinator_address: str | None = _setting(None, "host:port of process 0")
    num_processes: int | None = _setting(None, "number of processes of a multi-host run")
    process_id: int | None = _setting(None, "this process's index in a multi-host run")

    def to_json(self) -> str:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in TRANSIENT}
        if self.model.lstrip().startswith("{"):  # a JSON model spec is written as an object
            data["model"] = json.loads(self.model)
        return json.dumps(data, indent=2)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def data_config(self) -> DataConfig:
        return DataConfig(
            name=self.data,
            data_dir=self.data_dir,
            image_size=self.image_size or DEFAULT_IMAGE_SIZE,
            num_workers=self.num_workers,
            prefetch=self.prefetch,
            seed=self.seed,
            max_bad_fraction=self.max_bad_fraction,
            randaugment=self.randaugment,
            random_erasing=self.random_erasing,
            repeated_aug=self.repeated_aug,
        )

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.steps if self.steps is not None else self.epochs * steps_per_epoch

    def optim_config(self, steps_per_epoch: int) -> OptimConfig:
        warmup = self.warmup_steps
        if warmup < 0:
            warmup = round(self.warmup_epochs * steps_per_epoch)
        return OptimConfig(
            lr=self.lr,
            warmup_steps=warmup,
            total_steps=self.total_steps(steps_per_epoch),
            weight_decay=self.weight_decay,
            clip_norm=self.clip_norm,
            label_smoothing=self.label_smoothing,
            min_lr_ratio=self.min_lr_ratio,
            grad_accum=self.grad_accum,
            warmup_init_lr=self.warmup_lr,
            min_lr=self.min_lr,
            ema_decay=self.ema_decay,
        )

    def check(self) -> None:
        """Raise ConfigError for settings that cannot work whatever the data and devices."""
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"--dtype must be one of {list(COMPUTE_DTYPES)}, got {self.dtype!r}")
        # (setting, the values it may take, as words)
        ranges = [
            ("drop_path_rate", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("ema_decay", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("mixup_switch_prob", lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("warmup_epochs", lambda v: v >= 0, ">= 0"),
            ("warmup_lr", lambda v: v >= 0, ">= 0"),
            ("min_lr", lambda v: v is None or v >= 0, ">= 0"),
            ("mixup", lambda v: v >= 0, ">= 0"),
            ("cutmix", lambda v: v >= 0, ">= 0"),
        ]
        for name, valid, words in ranges:
            if not valid(getattr(self, name)):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be {words}, got {getattr(self, name)}")
        if self.image_size is not None and self.image_size <= 0:
            raise ConfigError(f"--image-size must be positive, got {self.image_size}")
        if not self.compile_cache:
            raise ConfigError("--compile-cache needs a directory, 'none' or 'auto'")
