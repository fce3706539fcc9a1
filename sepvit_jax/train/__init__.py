"""Sharded SepViT training: `python train.py` / `sepvit-train` (see `sepvit_jax.train.run`).

entry.py        the process entry point (allocator policy, fast exit)
run.py          the run top to bottom: hosts -> mesh -> data -> model and state -> steps -> loop
                -> export
config.py       TrainConfig: every setting, flags over a dataclass
optim.py        AdamW, warm-up + cosine schedule, clipping, the loss
steps.py        the train state's plan and init, the jitted train and eval steps
startup.py      compiling the programs ahead of the first batch, beside building the state
loop.py         the step loop: progress, logging, evaluation, checkpoints, clean stops
checkpoints.py  Orbax CheckpointManager of the train state and the data iterator
rundir.py       runs/NAME/: config.json, metrics.jsonl, curves.png, model/
weights.py      --init-from weights in, the final model out
hosts.py        JAX's distributed runtime, process 0
plotting.py     the PNG of the loss and accuracy curves
allocator.py    glibc: keep freed host memory for reuse (process-level, used by entry.py)
"""
