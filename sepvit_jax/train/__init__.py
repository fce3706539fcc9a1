"""Sharded SepViT training: `python train.py` (see `sepvit_jax.train.run`).

config.py       TrainConfig: every setting, flags over a dataclass
steps.py        optimizer, sharded train-state init, the jitted train and eval steps
loop.py         the step loop: progress, logging, evaluation, checkpoints, clean stops
checkpoints.py  Orbax CheckpointManager of the train state and the data iterator
run.py          the run top to bottom: hosts -> mesh -> data -> state -> steps -> loop
plotting.py     the PNG of the loss and accuracy curves
"""
