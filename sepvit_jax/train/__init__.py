"""Sharded SepViT training: `python train.py` / `sepvit-train` (see `sepvit_jax.train.run`).

entry.py          the process entry point (allocator policy, fast exit)
run.py            the run top to bottom: hosts -> mesh -> data -> model and state -> steps -> loop
                  -> export
settle.py         what a run starts from: image size, continuation, model, config.json's record
settings.py       TrainConfig: every setting, one dataclass
config.py         flags over it: defaults < --recipe < saved run < --config < flags
recipes.py        the named ImageNet recipes (--recipe)
modelspec.py      --model specs -> SepViTConfig
optim.py          AdamW, warm-up + cosine schedule, clipping, the losses, the parameters' EMA
mixing.py         mixup/cutmix inside the train step
state.py          the train state's plan and init (parameters, RNG, optimiser, EMA)
steps.py          the jitted train and eval steps
startup.py        compiling the programs ahead of the first batch, beside building the state
compile_cache.py  the persistent XLA compilation cache (--compile-cache)
loop.py           the step loop: progress, logging, evaluation, checkpoints, clean stops
checkpoints.py    Orbax CheckpointManager of the train state and the data iterator
rundir.py         runs/NAME/: config.json, metrics.jsonl, curves.png, model/
describe.py       the preprocessing record of the run's data (saved with the model)
weights.py        --init-from weights in, the final model out
hosts.py          JAX's distributed runtime, process 0
plotting.py       the PNG of the loss, accuracy and learning-rate curves
allocator.py      glibc: keep freed host memory for reuse (process-level, used by entry.py)
errors.py         ConfigError
"""
