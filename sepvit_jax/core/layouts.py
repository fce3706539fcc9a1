"""The three state_dict layouts vit-pytorch's SepViT has written, as views of the weight table.

    layout    vit-pytorch        what differs from the current layout
    current   1.4.3 and later    -
    prenorm   0.32.2 to 1.4.2    PreNorm wrappers: `P.0.norm.*` + `P.0.fn.*` (attention),
                                 `P.1.norm.*` + `P.1.fn.net.0` / `.fn.net.3` (feed-forward)
    grouped   0.32.0 to 0.32.1   prenorm, and `window_tokens_to_qk.3` a grouped Conv1d
                                 (groups=heads, weight (2*inner, dim_head, 1)); 0.32.0 also has
                                 an unused `to_patches` conv (never called in forward)

(P = layers.i.2.layers.j. Read off the published wheels: 1.4.2 is the last PreNorm release and
1.4.3 already writes the current layout.) PreNorm computes exactly the current function. A
grouped 1x1 conv equals a dense one whose weight is zero outside the diagonal blocks (output
channel o of group g = o // (2*dim_head) reads input channels [g*dim_head, (g+1)*dim_head)), so
grouped checkpoints convert exactly into the current architecture; back, only while the weight
is still block-diagonal. Each layout is the current weight table with its own key names, order
and (grouped) one transform: the model's structure stays written once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.core.errors import CheckpointError
from sepvit_jax.core.table import CONV1D_1X1, Row, Shape, Transform, weight_table

_BLOCK = re.compile(r"^(layers\.\d+\.2\.layers\.\d+)\.([01])\.(.+)$")
# Feed-forward: current name -> PreNorm name.
_PRENORM_FF = {"net.0.g": "norm.g", "net.0.b": "norm.b"}
_PRENORM_FF_PREFIX = {"net.1.": "fn.net.0.", "net.4.": "fn.net.3."}


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    versions: str  # the vit-pytorch releases that write it
    prenorm: bool = False
    grouped: bool = False

    @property
    def label(self) -> str:
        return f"vit-pytorch {self.versions} '{self.name}' layout"

    def key(self, current_key: str) -> str:
        """This layout's name of a current-layout key."""
        if not self.prenorm or not (match := _BLOCK.match(current_key)):
            return current_key
        block, branch, rest = match.groups()
        if branch == "0":
            return current_key if rest.startswith("norm.") else f"{block}.0.fn.{rest}"
        if rest in _PRENORM_FF:
            return f"{block}.1.{_PRENORM_FF[rest]}"
        for old, new in _PRENORM_FF_PREFIX.items():
            if rest.startswith(old):
                return f"{block}.1.{new}{rest[len(old) :]}"
        return current_key

    def table(self, config: SepViTConfig) -> list[Row]:
        """The weight table in this layout: its key names, order and shapes."""
        rows = weight_table(config)
        if not self.prenorm:
            return rows
        out = [dataclasses.replace(row, torch_key=self.key(row.torch_key)) for row in rows]
        for i, row in enumerate(rows):
            # PreNorm lists its norm (g, b) before the wrapped module's own window tokens.
            if row.torch_key.endswith(".0.window_tokens"):
                out[i : i + 3] = [out[i + 1], out[i + 2], out[i]]
        if self.grouped:
            out = [_grouped(row, config) for row in out]
        return out

    def optional(self, config: SepViTConfig) -> dict[str, Shape]:
        """Tensors a checkpoint of this layout may hold that the model never uses."""
        if not self.grouped:
            return {}
        return {
            "to_patches.weight": (config.dim, config.channels, 7, 7),
            "to_patches.bias": (config.dim,),
        }


CURRENT = Layout("current", "1.4.3 and later")
PRENORM = Layout("prenorm", "0.32.2 to 1.4.2", prenorm=True)
GROUPED = Layout("grouped", "0.32.0 to 0.32.1", prenorm=True, grouped=True)
LAYOUTS = {layout.name: layout for layout in (CURRENT, PRENORM, GROUPED)}


def _grouped(row: Row, config: SepViTConfig) -> Row:
    if not row.torch_key.endswith("window_tokens_to_qk.3.weight"):
        return row
    stage = int(row.torch_key.split(".")[1])
    heads, dh = config.stage_heads[stage], config.dim_head
    return dataclasses.replace(
        row,
        transform=_grouped_transform(heads, dh, row.torch_key),
        torch_shape=(2 * heads * dh, dh, 1),
    )


def _grouped_transform(heads: int, dh: int, key: str) -> Transform:
    inner = heads * dh
    # Head g's block: output channels [2*dh*g, 2*dh*(g+1)) read input channels [dh*g, dh*(g+1)).
    blocks = [
        (slice(2 * dh * g, 2 * dh * (g + 1)), slice(dh * g, dh * (g + 1))) for g in range(heads)
    ]

    def to_flax(weight: np.ndarray) -> np.ndarray:
        dense = np.zeros((2 * inner, inner, 1), weight.dtype)
        for rows, cols in blocks:
            dense[rows, cols] = weight[rows]
        return CONV1D_1X1.to_flax(dense)

    def to_torch(kernel: np.ndarray) -> np.ndarray:
        dense = CONV1D_1X1.to_torch(kernel)
        off_block = dense.copy()
        for rows, cols in blocks:
            off_block[rows, cols] = 0
        if np.any(off_block):
            raise CheckpointError(
                f"{key} is no longer block-diagonal, so the grouped layout of vit-pytorch "
                f"{GROUPED.versions} cannot hold it; write the 'current' or 'prenorm' layout"
            )
        return np.concatenate([dense[rows, cols] for rows, cols in blocks], axis=0)

    return Transform("grouped_conv1d_1x1", to_flax, to_torch, shape=lambda _: (inner, 2 * inner))


def detect(state_dict: Mapping[str, Any]) -> Layout:
    """The layout a state_dict's block keys vote for (PreNorm-only names against current-only
    names); grouped when `to_patches` is present or a window-token projection reads fewer input
    channels than a dense one would (with one head per stage the two layouts are the same
    function and read as prenorm)."""
    prenorm = current = 0
    for key in state_dict:
        if match := _BLOCK.match(key):
            _, branch, rest = match.groups()
            if rest.startswith("fn.") or (branch == "1" and rest.startswith("norm.")):
                prenorm += 1
            elif not rest.startswith("norm."):
                current += 1
    if prenorm <= current:
        return CURRENT
    if "to_patches.weight" in state_dict:
        return GROUPED
    for key, value in state_dict.items():
        shape = tuple(value.shape)
        if (
            key.endswith("window_tokens_to_qk.3.weight")
            and len(shape) == 3
            and 2 * shape[1] != shape[0]
        ):
            return GROUPED
    return PRENORM
