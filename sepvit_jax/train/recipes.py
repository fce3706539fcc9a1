"""Named training recipes (`--recipe NAME`): SepViT's ImageNet-1k settings as TrainConfig values.

A recipe sits just above the dataclass defaults: the run's saved config (--resume), `--config`
and every flag given override any of its values (see `config.parse_args`).

Sources:
- liwei109/SepViT, classification/main.py (the official training script, DeiT's): AdamW, lr 5e-4
  per 512 images of global batch, weight decay 0.05, 300 epochs, 5 warm-up epochs from 1e-6,
  cosine to 1e-5, gradient clip 5, label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1,
  random erasing 0.25, mixup 0.8, cutmix 1.0, switch probability 0.5, no EMA (`model_ema =
  None`), drop path 0.2 (its default, and the README's SepViT-T command).
- Repeated augmentation 3: DeiT's default (the official script keeps `--repeated-aug` off unless
  asked; DeiT's recipe, which it follows, turns it on).
- Drop path of the other sizes: the official repository publishes only SepViT-T's. Small and
  base take Swin's scaling (Swin-T/S/B 0.2/0.3/0.5, Liu et al. 2021), whose widths and depths
  SepViT-T/S/B follow; lite, smaller than tiny, takes DeiT-S's 0.1 (Touvron et al. 2021).
"""

from __future__ import annotations

import textwrap
from typing import Any

# Learning rate per 512 images of global batch (DeiT's linear scaling rule).
LR_PER_512 = 5e-4

COMMON: dict[str, Any] = {
    "data": "imagefolder",
    "image_size": 224,
    "batch_size": 1024,
    "epochs": 300,
    "warmup_epochs": 5.0,
    "warmup_lr": 1e-6,
    "min_lr": 1e-5,
    "weight_decay": 0.05,
    "clip_norm": 5.0,
    "label_smoothing": 0.1,
    "randaugment": "rand-m9-mstd0.5-inc1",
    "random_erasing": 0.25,
    "mixup": 0.8,
    "cutmix": 1.0,
    "mixup_switch_prob": 0.5,
    "repeated_aug": 3,
    "ema_decay": 0.0,
}

# name: (model, drop path rate, where the drop path rate comes from)
MODELS: dict[str, tuple[str, float, str]] = {
    "imagenet_sepvit_lite": ("sepvit_lite", 0.1, "DeiT-S's"),
    "imagenet_sepvit_tiny": ("sepvit_tiny", 0.2, "official SepViT-T"),
    "imagenet_sepvit_small": ("sepvit_small", 0.3, "Swin-S's"),
    "imagenet_sepvit_base": ("sepvit_base", 0.5, "Swin-B's"),
}
RECIPES = tuple(MODELS)

# A setting given above the recipe also replaces the recipe's value of its alternative: an
# explicit --min-lr-ratio means the recipe's --min-lr (which would win over it) is not wanted.
ALTERNATIVES = {"min_lr_ratio": "min_lr"}


class UnknownRecipe(ValueError):
    pass


def values(name: str, given: set[str]) -> dict[str, Any]:
    """The recipe's settings, less those that `given` (set above the recipe) replaces.

    The learning rate is not among them: it depends on the resolved batch size (`scaled_lr`).
    """
    if name not in MODELS:
        raise UnknownRecipe(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    model, drop_path_rate, _ = MODELS[name]
    settings = {**COMMON, "model": model, "drop_path_rate": drop_path_rate}
    dropped = given | {ALTERNATIVES[k] for k in given if k in ALTERNATIVES}
    return {k: v for k, v in settings.items() if k not in dropped}


def scaled_lr(batch_size: int) -> float:
    return LR_PER_512 * batch_size / 512


def _flag(name: str, value: Any) -> str:
    return f"--{name.replace('_', '-')} {value}"


def describe() -> str:
    """What each recipe sets, for `--help`."""
    common = " ".join(_flag(k, v) for k, v in COMMON.items())
    common += f" --lr {LR_PER_512:g}*batch-size/512 (liwei109/SepViT's classification/main.py;"
    common += " repeated aug 3: DeiT's)"
    lines = [
        "recipes (--recipe NAME; the flags given and --config override any of these):",
        textwrap.fill(
            common,
            79,
            initial_indent="  every recipe: ",
            subsequent_indent="    ",
            break_on_hyphens=False,
        ),
    ]
    for name, (model, rate, source) in MODELS.items():
        lines.append(f"  {name}: --model {model} --drop-path-rate {rate} ({source})")
    return "\n".join(lines)
