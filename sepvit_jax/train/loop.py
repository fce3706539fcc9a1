"""The step loop of a SepViT run: feed batches, log, evaluate, checkpoint, stop cleanly.

No host sync per step: the metrics of every step stay on device until a log or checkpoint
point (end of epoch, every `log_every` / `checkpoint_every` steps, the last step, a stop
request), where they are fetched together and checked for NaN/inf *before* anything is saved,
so a checkpoint never holds a diverged state. Dispatch runs at most two steps ahead of the
device: a slow input pipeline overlaps with compute, and memory stays bounded. The step itself
runs under `jax.transfer_guard("disallow")`, so a hidden host<->device copy fails loudly.

SIGTERM / SIGINT set a flag: the current step finishes, a checkpoint is saved and the run exits
0; a second signal ends the process at once. With several processes, SIGTERM goes through JAX's
preemption sync point so that every host stops at the same step (SIGINT, which reaches one host
only, keeps its default and ends that process).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from sepvit_jax import data as data_lib
from sepvit_jax import sharding

# With the default --checkpoint-every 0 (epoch ends), checkpoints are at least this far apart;
# the end of the run and a stop request always save.
MIN_SECONDS_BETWEEN_EPOCH_CHECKPOINTS = 60.0


class Diverged(RuntimeError):
    """The loss or the gradient became NaN or infinite."""


class _StopFlag:
    """Installs SIGTERM/SIGINT handlers that ask the loop to stop after the current step."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        # Multi-process: JAX's preemption notifier owns SIGTERM, and a stop must be agreed on.
        if jax.process_count() == 1:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name
        self._restore()  # a second signal is not caught: it ends the process

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc):
        self._restore()

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
            self.signal_name = self.signal_name or "SIGTERM"
        return self.signal_name is not None


@contextlib.contextmanager
def _closing(current_bar):
    """Closes whichever progress bar is open at the end, so messages start on a fresh line."""
    try:
        yield
    finally:
        bar = current_bar()
        if bar is not None:
            bar.close()


def evaluate(eval_step, state, data_cfg, batch_size: int, batch_sharding) -> dict:
    """Accuracy and mean loss over the whole held-out set (each process reads its share)."""
    totals = jax.device_put(jnp.zeros(3, jnp.float32), sharding.replicated(batch_sharding.mesh))
    for local in data_lib.eval_batches(
        data_cfg,
        batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        batch = sharding.global_batch(local, batch_sharding)
        totals = eval_step(state["params"], state["rest"], batch, totals)
    correct, loss, count = np.asarray(jax.device_get(totals), np.float64)
    return {"test_accuracy": correct / count, "test_loss": loss / count}


class Loop:
    """Runs steps `state.step .. total` of one run (see `sepvit_jax.train.run`).

    Args:
      cfg: the run's TrainConfig.
      run_dir: where rows are logged (`RunDir`).
      checkpoints: the run's `Checkpoints`.
      steps_per_epoch, total: schedule length.
      evaluate: `evaluate(state) -> {"test_accuracy", "test_loss"}` over the held-out set.
    """

    def __init__(self, cfg, run_dir, checkpoints, steps_per_epoch: int, total: int, evaluate):
        self.cfg, self.run_dir, self.checkpoints = cfg, run_dir, checkpoints
        self.steps_per_epoch, self.total = steps_per_epoch, total
        self.evaluate = evaluate
        self.main = jax.process_index() == 0
        # Default: every epoch, or every 100 steps when epochs are longer (an ImageNet epoch
        # should not hide a NaN, nor pile up thousands of device scalars, for an hour).
        self.log_every = cfg.log_every or min(steps_per_epoch, 100)
        self.last_saved: int | None = checkpoints.latest_step()
        self.last_saved_time = time.monotonic()
        self.last_accuracy: float | None = None

    def _check_finite(self, first_step: int, metrics: list[dict]) -> dict:
        """Means of the fetched per-step metrics (the learning rate: the last step's); raises
        Diverged at the first non-finite one."""
        fetched = jax.device_get(metrics)
        for i, m in enumerate(fetched):
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                kept = (
                    f"the last good checkpoint is step {self.last_saved} in "
                    f"{self.checkpoints.directory}"
                    if self.last_saved is not None
                    else "no checkpoint was saved before it"
                )
                raise Diverged(
                    f"non-finite training loss ({m['loss']}, gradient norm {m['grad_norm']}) "
                    f"at step {first_step + i + 1}; stopped without saving; {kept}"
                )
        means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        return {**means, "lr": float(fetched[-1]["lr"])}

    def _epoch_save_due(self) -> bool:
        """At an epoch end with the default cadence: save unless the last save is recent.

        Short epochs (a small dataset) would otherwise spend a good part of the run writing
        checkpoints. Process 0's clock decides for every process (saving is collective).
        """
        due = time.monotonic() - self.last_saved_time >= MIN_SECONDS_BETWEEN_EPOCH_CHECKPOINTS
        if jax.process_count() > 1:
            due = bool(multihost_utils.broadcast_one_to_all(np.array(due)))
        return due

    def _progress(self, step: int) -> tqdm:
        epochs = math.ceil(self.total / self.steps_per_epoch)
        return tqdm(
            total=min(self.steps_per_epoch, self.total - step + step % self.steps_per_epoch),
            initial=step % self.steps_per_epoch,
            desc=f"epoch {step // self.steps_per_epoch + 1}/{epochs}",
            unit="step",
            leave=False,
            disable=not self.main,
            file=sys.stderr,
        )

    def run(self, state, train_step, train_iter, batch_sharding) -> dict:
        """Trains until `total` (or `--stop-at-step`, or a signal); returns the final state."""
        cfg, steps_per_epoch = self.cfg, self.steps_per_epoch
        step = int(jax.device_get(state["step"]))
        end = self.total if cfg.stop_at_step is None else min(self.total, cfg.stop_at_step)
        pending: list[dict] = []  # device-side metrics of the steps since the last fetch
        first = step
        bar = None
        t_epoch = time.perf_counter()
        with _StopFlag() as stop, _closing(lambda: bar):
            while step < end:
                bar = bar or self._progress(step)
                batch = sharding.global_batch(next(train_iter), batch_sharding)
                with jax.transfer_guard("disallow"):
                    state, metrics = train_step(state, batch)
                pending.append(metrics)
                if len(pending) > 2:  # bound how far dispatch runs ahead of the device
                    jax.block_until_ready(pending[-3]["loss"])
                step += 1
                bar.update(1)
                stopping = stop.should_stop(step)
                epoch_end = step % steps_per_epoch == 0 or step == self.total
                every = cfg.checkpoint_every
                save = stopping or step == end
                if not save:
                    save = step % every == 0 if every else epoch_end and self._epoch_save_due()
                log = save or epoch_end or step % self.log_every == 0
                if not log:
                    continue
                train = self._check_finite(first, pending)
                pending, first = [], step
                row = {"step": step, "epoch": step / steps_per_epoch, "lr": train.pop("lr")}
                row.update({f"train_{k}": v for k, v in train.items()})
                saved_metrics = None
                if epoch_end:
                    bar.close()
                    bar = None
                    result = self.evaluate(state)
                    row.update(result)
                    self.last_accuracy = result["test_accuracy"]
                    saved_metrics = {"test_accuracy": result["test_accuracy"]}
                    self._print_epoch(step, train, result, time.perf_counter() - t_epoch)
                    t_epoch = time.perf_counter()
                self.run_dir.log(row)
                if save:
                    self.checkpoints.save(step, state, train_iter, metrics=saved_metrics)
                    self.last_saved, self.last_saved_time = step, time.monotonic()
                if stopping:
                    break
            self.checkpoints.wait()
        self._print_end(step, stop.signal_name)
        return state

    def _print_epoch(self, step: int, train: dict, result: dict, seconds: float) -> None:
        if self.main:
            epochs = math.ceil(self.total / self.steps_per_epoch)
            epoch = math.ceil(step / self.steps_per_epoch)
            print(
                f"epoch {epoch}/{epochs}  train loss {train['loss']:.4f}  "
                f"test loss {result['test_loss']:.4f}  test acc {result['test_accuracy']:.4f}  "
                f"({seconds:.1f} s)",
                flush=True,
            )

    def _print_end(self, step: int, signal_name: str | None) -> None:
        if not self.main:
            return
        if signal_name:
            print(
                f"received {signal_name}: saved a checkpoint at step {step} in "
                f"{self.checkpoints.directory}; continue with --resume --run-name "
                f"{self.run_dir.name}",
                file=sys.stderr,
            )
        elif step < self.total:
            print(f"stopped at step {step} of {self.total} (--stop-at-step)", file=sys.stderr)
        elif self.last_accuracy is not None:
            print(f"final test accuracy: {self.last_accuracy:.4f}", flush=True)
