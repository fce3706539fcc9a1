"""The ground floor: what the rest of the project builds on, importing neither JAX nor torch.

    config.py     SepViTConfig (vit-pytorch's keyword arguments) and the named variants
    table.py      the weight table: torch key <-> Flax path <-> transform, with torch shapes;
                  the one shape check and the one state_dict <-> parameter-tree mapping
    infer.py      a state_dict's config: hyper-parameters read off the weights, flags over them
    format.py     the checkpoint directory: metadata, atomic writes
    torch_io.py   reading and writing torch / safetensors files (torch imported only there,
                  when a file is read or written), with unwrap.py (wrappers, prefixes) and
                  pickles.py (refusing pickles that would run code)
    errors.py     CheckpointError

`sepvit_jax`'s models and `sepvit_torch` import only this floor; the converter and the trainer sit
on top. It lives inside `sepvit_jax` (whose `__init__` loads nothing heavy) so that the project
keeps its three top-level packages and a torch-only user still needs no JAX.
"""
