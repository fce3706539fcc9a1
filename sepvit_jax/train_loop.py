"""The step loop of a SepViT run: feed batches, log, evaluate, checkpoint, stop cleanly.

No host sync per step: the loss and other metrics of every step stay on device until a log
point (end of epoch, or every `log_every` steps), where they are fetched together and checked
for NaN/inf before any checkpoint is written. Dispatch runs at most two steps ahead of the
device, so a slow input pipeline overlaps with compute but memory stays bounded.

SIGTERM / SIGINT set a flag: the current step finishes, a checkpoint is saved (synchronously)
and the run exits 0. With several processes, SIGTERM goes through JAX's preemption sync point
so every host stops at the same step.
"""

from __future__ import annotations

import math
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm


class Diverged(RuntimeError):
    """The loss or the gradient became NaN or infinite."""


class _StopFlag:
    """Installs SIGTERM/SIGINT handlers that ask the loop to stop after the current step."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        signals = [signal.SIGINT]
        if jax.process_count() == 1:  # multi-process: JAX's preemption notifier owns SIGTERM
            signals.append(signal.SIGTERM)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
            self.signal_name = self.signal_name or "SIGTERM"
        return self.signal_name is not None


class Loop:
    """Runs steps `state.step .. total` of one run (see `sepvit_jax.trainer.run`)."""

    def __init__(self, cfg, run_dir, ckpts, steps_per_epoch: int, total: int, schedule):
        self.cfg, self.run_dir, self.ckpts = cfg, run_dir, ckpts
        self.spe, self.total, self.schedule = steps_per_epoch, total, schedule
        self.main = jax.process_index() == 0
        self.last_saved: int | None = ckpts.latest_step()
        self.last_accuracy: float | None = None

    def _check_finite(self, first_step: int, metrics: list[dict]) -> dict:
        fetched = jax.device_get(metrics)
        for i, m in enumerate(fetched):
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                step = first_step + i + 1
                kept = (
                    f"the last good checkpoint is step {self.last_saved} in "
                    f"{self.ckpts.manager.directory}"
                    if self.last_saved is not None
                    else "no checkpoint was saved before it"
                )
                raise Diverged(
                    f"non-finite training loss ({m['loss']}, gradient norm {m['grad_norm']}) "
                    f"at step {step}; stopped without saving; {kept}"
                )
        return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}

    def _save(self, step: int, state, train_iter, metrics=None) -> None:
        self.ckpts.save(step, state, train_iter, metrics=metrics)
        self.last_saved = step

    def run(self, state, train_step, eval_step, train_iter, dcfg, bsharding) -> int:
        from sepvit_jax import sharding
        from sepvit_jax.trainer import evaluate

        cfg, spe = self.cfg, self.spe
        step = int(jax.device_get(state["step"]))
        end = self.total if cfg.stop_at_step is None else min(self.total, cfg.stop_at_step)
        epochs = math.ceil(self.total / spe)
        pending: list[dict] = []
        first = step
        bar = None
        t_epoch = time.perf_counter()
        with _StopFlag() as stop:
            while step < end:
                if bar is None:
                    bar = tqdm(
                        total=spe,
                        initial=step % spe,
                        desc=f"epoch {step // spe + 1}/{epochs}",
                        leave=False,
                        disable=not self.main,
                        file=sys.stderr,
                    )
                batch = sharding.global_batch(next(train_iter), bsharding)
                state, metrics = train_step(state, batch)
                pending.append(metrics)
                if len(pending) > 2:  # bound dispatch run-ahead
                    jax.block_until_ready(pending[-3]["loss"])
                step += 1
                bar.update(1)
                stopping = stop.should_stop(step)
                epoch_end = step % spe == 0 or step == self.total
                log_now = epoch_end or stopping or step == end
                log_now = log_now or bool(cfg.log_every and step % cfg.log_every == 0)
                if not log_now:
                    continue
                train = self._check_finite(first, pending)
                pending, first = [], step
                row = {"step": step, "epoch": step / spe, "lr": float(self.schedule(step - 1))}
                row.update({f"train_{k}": v for k, v in train.items()})
                ckpt_metrics = None
                if epoch_end:
                    bar.close()
                    bar = None
                    result = evaluate(eval_step, state, dcfg, cfg.batch_size, bsharding)
                    row.update(result)
                    self.last_accuracy = result["test_accuracy"]
                    ckpt_metrics = {"test_accuracy": result["test_accuracy"]}
                    if self.main:
                        print(
                            f"epoch {math.ceil(step / spe)}/{epochs}  train loss "
                            f"{train['loss']:.4f}  test acc {result['test_accuracy']:.4f}  "
                            f"({time.perf_counter() - t_epoch:.1f} s)",
                            flush=True,
                        )
                    t_epoch = time.perf_counter()
                self.run_dir.log(row)
                every = cfg.checkpoint_every
                if stopping or step == end or (epoch_end if not every else step % every == 0):
                    self._save(step, state, train_iter, ckpt_metrics)
                if stopping:
                    break
        if bar is not None:
            bar.close()
        self.ckpts.wait()
        if stop.signal_name:
            print(
                f"received {stop.signal_name}: saved a checkpoint at step {step} in "
                f"{self.ckpts.manager.directory}; continue with --resume --run-name "
                f"{self.run_dir.name}",
                file=sys.stderr,
            )
        elif step < self.total:
            print(f"stopped at step {step} of {self.total} (--stop-at-step)", file=sys.stderr)
        elif self.last_accuracy is not None:
            print(f"final test accuracy: {self.last_accuracy:.4f}", flush=True)
        return 0
