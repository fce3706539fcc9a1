"""RandAugment with timm's op set and magnitude semantics, on Pillow images.

Works on decoded ``PIL.Image`` objects (RGB, uint8, so HWC when viewed as an array) before
normalisation, which is where the imagefolder pipeline calls it. Every random draw comes from the
``np.random.Generator`` passed to ``RandAugment.__call__`` (Grain's ``random_map`` gives each
record its own seeded generator), so the output is a pure function of (image, generator state).

Configuration strings follow timm: ``rand-m9-mstd0.5-inc1`` means magnitude 9 (of 10), gaussian
magnitude noise with std 0.5, and the "increasing" op list whose severity grows with magnitude.
Sections: ``m`` magnitude (int), ``n`` ops per image (int), ``mstd`` magnitude noise std (float;
above 100 means uniform in [0, m]), ``mmax`` magnitude clip (int, default 10), ``inc`` 0/1,
``p`` the probability of each chosen op (default 0.5; newer timm), and ``w`` (op-choice weight
set, only 0 exists).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOM = 10.0  # magnitude M maps to the fraction M / 10 of each op's full range
# ImageNet mean * 255, rounded, as timm hands it to RandAugment as the fill of geometric ops.
IMAGENET_FILL = (124, 116, 104)

# fmt: off
STANDARD_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)
# fmt: on
# Same order as STANDARD_OPS; the ops whose strength used to fall with magnitude are replaced by
# variants whose strength grows with it.
INCREASING_OPS = tuple(
    f"{name}Increasing"
    if name in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness")
    else name
    for name in STANDARD_OPS
)
# timm's only op-choice weight set ("w0"), by standard op name.
# fmt: off
_CHOICE_WEIGHTS_0 = {
    "Rotate": 0.3, "ShearX": 0.2, "ShearY": 0.2, "TranslateXRel": 0.1, "TranslateYRel": 0.1,
    "Color": 0.025, "Sharpness": 0.025, "AutoContrast": 0.025, "Solarize": 0.005,
    "SolarizeAdd": 0.005, "Contrast": 0.005, "Brightness": 0.005, "Equalize": 0.005,
    "Posterize": 0.0, "Invert": 0.0,
}
# fmt: on
_ENHANCE_OPS = ("Color", "Contrast", "Brightness", "Sharpness")
# Ops whose argument gets a random sign; the increasing enhance ops go below or above 1.0.
SIGNED_OPS = frozenset(
    ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
    + tuple(f"{n}Increasing" for n in _ENHANCE_OPS)
)
_INTERPOLATIONS = ("bilinear", "bicubic", "random")
_SECTION = re.compile(r"(mstd|mmax|inc|m|n|p|w)(\d.*)")


def _number(kind: type, key: str, value: str, section: str):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(
            f"RandAugment section {section!r}: {key} needs a {kind.__name__}"
        ) from None


def parse_rand_augment(config: str) -> dict[str, Any]:
    """Keyword arguments of ``RandAugment`` from a timm string such as ``rand-m9-mstd0.5-inc1``.

    Args:
        config: ``rand`` followed by dash-separated sections ``mM``, ``nN``, ``mstdS``,
            ``mmaxX``, ``incI``, ``pP``, ``wW`` in any order; omitted ones keep their defaults.

    Raises:
        ValueError: naming the section that is unknown or malformed.
    """
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment config {config!r} must start with 'rand'")
    kwargs: dict[str, Any] = {}
    for section in parts[1:]:
        match = _SECTION.fullmatch(section)
        if match is None:
            raise ValueError(f"unknown or malformed RandAugment section {section!r} in {config!r}")
        key, value = match.groups()
        if key == "mstd":
            std = _number(float, key, value, section)
            # timm's convention: a huge std stands for "uniform in [0, magnitude]".
            kwargs["magnitude_std"] = math.inf if std > 100 else std
        elif key == "p":
            kwargs["prob"] = _number(float, key, value, section)
        elif key == "mmax":
            kwargs["magnitude_max"] = float(_number(int, key, value, section))
        elif key == "inc":
            # int(), not bool(str): timm's bool("0") is True, so "inc0" would select the
            # increasing ops there; here it means what it says.
            kwargs["increasing"] = _number(int, key, value, section) != 0
        elif key == "m":
            kwargs["magnitude"] = float(_number(int, key, value, section))
        elif key == "n":
            kwargs["num_layers"] = _number(int, key, value, section)
        else:  # "w"
            kwargs["weight_set"] = _number(int, key, value, section)
    return kwargs


def _scaled(full: float) -> Callable[[float], float]:
    return lambda m: m / LEVEL_DENOM * full


def _bits(m: float) -> int:
    return int(m / LEVEL_DENOM * 4)


def _threshold(m: float) -> int:
    return int(m / LEVEL_DENOM * 256)


# Unsigned magnitude -> op argument. Signed ops multiply the result by the random sign, except
# the increasing enhance ops, handled in op_argument (their sign acts around 1.0).
_LEVEL_TO_ARG: dict[str, Callable[[float], float]] = {
    "Rotate": _scaled(30.0),  # degrees
    "ShearX": _scaled(0.3),
    "ShearY": _scaled(0.3),
    "Posterize": _bits,  # bits kept: 0..4, so severity falls with magnitude
    "PosterizeIncreasing": lambda m: 4 - _bits(m),  # bits kept: 4..0
    "Solarize": _threshold,  # invert pixels >= threshold: 0..256, severity falls
    "SolarizeIncreasing": lambda m: 256 - _threshold(m),
    "SolarizeAdd": lambda m: int(m / LEVEL_DENOM * 110),
    **{name: (lambda m: m / LEVEL_DENOM * 1.8 + 0.1) for name in _ENHANCE_OPS},
}


def op_argument(name: str, magnitude: float, sign: int = 1, translate_pct: float = 0.45):
    """The argument timm passes to op ``name`` at ``magnitude`` (None for argument-free ops).

    Args:
        name: an entry of ``STANDARD_OPS`` or ``INCREASING_OPS``.
        magnitude: the (already noised and clipped) magnitude, 10 being the full range.
        sign: +1 or -1; only ``SIGNED_OPS`` use it.
        translate_pct: the translation at magnitude 10, as a fraction of the image side.
    """
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * magnitude / LEVEL_DENOM * translate_pct
    if name.endswith("Increasing") and name[: -len("Increasing")] in _ENHANCE_OPS:
        # 1.0 is the identity; moving away from it either way strengthens the op. Kept >= 0.1.
        return max(0.1, 1.0 + sign * magnitude / LEVEL_DENOM * 0.9)
    try:
        arg = _LEVEL_TO_ARG[name](magnitude)
    except KeyError:
        raise ValueError(f"unknown RandAugment op {name!r}") from None
    return sign * arg if name in SIGNED_OPS else arg


def _fill_for(img, fill: tuple[int, ...]):
    return fill if len(img.getbands()) == len(fill) else fill[0]


def _affine(img, coeffs, fill, resample):
    # PIL's affine maps each output pixel (x, y) to input (a x + b y + c, d x + e y + f).
    return img.transform(
        img.size, Image.Transform.AFFINE, coeffs, resample=resample, fillcolor=_fill_for(img, fill)
    )


def _posterize(img, bits: int):
    # A LUT rather than ImageOps.posterize, which rejects 0 bits (all black) in recent Pillow.
    if bits >= 8:  # magnitudes above 10 (mmax) can ask for 8 or more bits: the identity
        return img
    mask = ~(2 ** (8 - max(bits, 0)) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _solarize_add(img, add: int, threshold: int = 128):
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def apply_op(img, name: str, arg, fill: tuple[int, ...] = IMAGENET_FILL, resample=None):
    """Applies RandAugment op ``name`` with argument ``arg`` (see ``op_argument``) to ``img``.

    Args:
        img: a PIL image (RGB or L).
        name: an entry of ``STANDARD_OPS`` or ``INCREASING_OPS``.
        arg: the op's argument (degrees, shear factor, translate fraction, bits, threshold, ...).
        fill: colour of the area uncovered by the geometric ops.
        resample: PIL resampling filter of the geometric ops (default bicubic).
    """
    resample = Image.Resampling.BICUBIC if resample is None else resample
    base = name[: -len("Increasing")] if name.endswith("Increasing") else name
    if base == "AutoContrast":
        return ImageOps.autocontrast(img)
    if base == "Equalize":
        return ImageOps.equalize(img)
    if base == "Invert":
        return ImageOps.invert(img)
    if base == "Rotate":
        return img.rotate(arg, resample=resample, fillcolor=_fill_for(img, fill))
    if base == "Posterize":
        return _posterize(img, int(arg))
    if base == "Solarize":
        return ImageOps.solarize(img, arg)
    if base == "SolarizeAdd":
        return _solarize_add(img, arg)
    if base in _ENHANCE_OPS:
        return getattr(ImageEnhance, base)(img).enhance(arg)
    shifts = {
        "ShearX": (1, arg, 0, 0, 1, 0),
        "ShearY": (1, 0, 0, arg, 1, 0),
        "TranslateXRel": (1, 0, arg * img.size[0], 0, 1, 0),
        "TranslateYRel": (1, 0, 0, 0, 1, arg * img.size[1]),
    }
    if base not in shifts:
        raise ValueError(f"unknown RandAugment op {name!r}")
    return _affine(img, shifts[base], fill, resample)


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """timm's RandAugment: ``num_layers`` ops drawn per image, each applied with ``prob``.

    Immutable and picklable (Grain workers pickle it). Build it from a timm string with
    ``RandAugment.from_string("rand-m9-mstd0.5-inc1")``.
    """

    magnitude: float = 10.0
    num_layers: int = 2
    magnitude_std: float = 0.0  # inf: uniform in [0, magnitude]
    magnitude_max: float | None = None  # clip bound; None means LEVEL_DENOM
    increasing: bool = False
    weight_set: int | None = None  # None: uniform choice with replacement
    prob: float = 0.5
    fill: tuple[int, ...] = IMAGENET_FILL
    interpolation: str = "bicubic"  # "bilinear" | "bicubic" | "random" (either, per op)
    translate_pct: float = 0.45

    def __post_init__(self):
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}")
        if self.weight_set not in (None, 0):
            raise ValueError(f"RandAugment weight set w{self.weight_set} does not exist (only w0)")
        if self.num_layers < 0 or self.magnitude_std < 0 or not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"invalid RandAugment settings: {self}")
        usable = sum(w > 0 for w in _CHOICE_WEIGHTS_0.values())
        if self.weight_set == 0 and self.num_layers > usable:
            # Weighted choice is without replacement: found here, not in a worker mid-epoch.
            raise ValueError(f"weight set w0 has {usable} ops, fewer than n{self.num_layers}")

    @classmethod
    def from_string(cls, config: str, **overrides) -> RandAugment:
        """Builds it from a timm config string; ``overrides`` set the other fields.

        Args:
            config: e.g. ``"rand-m9-mstd0.5-inc1"`` (see ``parse_rand_augment``).
            **overrides: e.g. ``fill`` or ``interpolation``.
        """
        return cls(**{**parse_rand_augment(config), **overrides})

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else STANDARD_OPS

    def sample_magnitude(self, rng: np.random.Generator) -> float:
        """The magnitude of one op application: noised, then clipped to [0, magnitude_max].

        Args:
            rng: this record's generator.
        """
        m = self.magnitude
        if math.isinf(self.magnitude_std):
            m = rng.uniform(0.0, m)
        elif self.magnitude_std > 0:
            m = rng.normal(m, self.magnitude_std)
        upper = LEVEL_DENOM if self.magnitude_max is None else self.magnitude_max
        return float(min(max(m, 0.0), upper))

    def _choose_ops(self, rng: np.random.Generator) -> list[str]:
        if self.weight_set is None:
            return [self.ops[i] for i in rng.integers(0, len(self.ops), size=self.num_layers)]
        # Weights are by position, the standard and increasing lists being aligned; weighted
        # choice is without replacement, as in timm.
        weights = np.array([_CHOICE_WEIGHTS_0[name] for name in STANDARD_OPS])
        picks = rng.choice(len(self.ops), self.num_layers, replace=False, p=weights / weights.sum())
        return [self.ops[i] for i in picks]

    def _resample(self, rng: np.random.Generator):
        if self.interpolation == "random":
            return (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(rng.integers(2))]
        return {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[
            self.interpolation
        ]

    def __call__(self, img, rng: np.random.Generator):
        """Augments one PIL image; every draw comes from ``rng``.

        Args:
            img: the decoded PIL image (RGB).
            rng: this record's generator.
        """
        for name in self._choose_ops(rng):
            if rng.random() > self.prob:
                continue
            magnitude = self.sample_magnitude(rng)
            sign = -1 if name in SIGNED_OPS and rng.random() > 0.5 else 1
            arg = op_argument(name, magnitude, sign, self.translate_pct)
            img = apply_op(img, name, arg, self.fill, self._resample(rng))
        return img
