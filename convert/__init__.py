"""convert: PyTorch SepViT checkpoints <-> sepvit_jax, through one explicit weight table."""

from convert.mapping import nnx_to_state_dict, state_dict_to_nnx, weight_table

__all__ = ["nnx_to_state_dict", "state_dict_to_nnx", "weight_table"]
