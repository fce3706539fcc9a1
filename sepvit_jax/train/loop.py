"""The step loop of a SepViT run: feed batches, log, evaluate, checkpoint, stop cleanly.

No host sync per step: the metrics of every step stay on device until a log or checkpoint
point (end of epoch, every `log_every` / `checkpoint_every` steps, the last step, a stop
request), where they are fetched together and checked for NaN/inf *before* anything is saved,
so a checkpoint never holds a diverged state. Dispatch runs at most two steps ahead of the
device: a slow input pipeline overlaps with compute, and memory stays bounded. The step itself
runs under `jax.transfer_guard("disallow")`, so a hidden host<->device copy fails loudly.

Progress bars only on a terminal; otherwise (a pipe, a log file) one line per epoch.

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
from sepvit_jax.train.rundir import significant

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


def _evaluate_params(eval_step, params, rest, data_cfg, batch_size, batch_sharding) -> dict:
    totals = jax.device_put(jnp.zeros(3, jnp.float32), sharding.replicated(batch_sharding.mesh))
    for local in data_lib.eval_batches(
        data_cfg,
        batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        batch = sharding.global_batch(local, batch_sharding)
        totals = eval_step(params, rest, batch, totals)
    correct, loss, count = np.asarray(jax.device_get(totals), np.float64)
    return {"test_accuracy": correct / count, "test_loss": loss / count}


def evaluate(eval_step, state, data_cfg, batch_size: int, batch_sharding) -> dict:
    """Accuracy and mean loss over the whole held-out set (each process reads its share), of the
    parameters and, when the state keeps one, of their moving average (keys `ema_test_*`)."""
    args = (data_cfg, batch_size, batch_sharding)
    result = _evaluate_params(eval_step, state["params"], state["rest"], *args)
    if "ema" in state:
        ema = _evaluate_params(eval_step, state["ema"], state["rest"], *args)
        result.update({f"ema_{k}": v for k, v in ema.items()})
    return result


class Loop:
    """Runs steps `state.step .. total` of one run (see `sepvit_jax.train.run`).

    Args:
      cfg: the run's TrainConfig.
      run_dir: where rows are logged (`RunDir`).
      checkpoints: the run's `Checkpoints`.
      steps_per_epoch, total: schedule length.
      evaluate: `evaluate(state) -> {"test_accuracy", "test_loss", ...}` over the held-out set.
      started: `time.perf_counter()` when the run started (rows log seconds since then).
    """

    def __init__(self, cfg, run_dir, checkpoints, steps_per_epoch: int, total: int, evaluate,
                 started: float):  # fmt: skip
        self.cfg, self.run_dir, self.checkpoints = cfg, run_dir, checkpoints
        self.steps_per_epoch, self.total = steps_per_epoch, total
        self.evaluate, self.started = evaluate, started
        self.main = jax.process_index() == 0
        # Default: every epoch, or every 100 steps when epochs are longer (an ImageNet epoch
        # should not hide a NaN, nor pile up thousands of device scalars, for an hour).
        self.log_every = cfg.log_every or min(steps_per_epoch, 100)
        self.last_saved: int | None = checkpoints.latest_step()
        self.last_saved_time = time.monotonic()
        self.last_result: dict | None = None  # the last evaluation
        self.bar: tqdm | None = None
        self.pending: list[dict] = []  # device-side metrics of the steps since the last fetch
        self.first = 0  # the step the pending metrics start after
        self.mark = (0.0, 0)  # (perf_counter, step) where the current training stretch began
        self.epoch_started = 0.0  # perf_counter at the start of the epoch being trained

    def _check_finite(self, metrics: list[dict]) -> dict:
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
                    f"at step {self.first + i + 1}; stopped without saving; {kept}"
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
            # On a terminal only: piped or logged, `\r` redraws would be fragments of lines.
            disable=not (self.main and sys.stderr.isatty()),
            file=sys.stderr,
        )

    def run(self, state, train_step, train_iter, batch_sharding) -> dict:
        """Trains until `total` (or `--stop-at-step`, or a signal); returns the final state."""
        cfg = self.cfg
        step = self.first = int(jax.device_get(state["step"]))
        end = self.total if cfg.stop_at_step is None else min(self.total, cfg.stop_at_step)
        self.mark = (time.perf_counter(), step)
        self.epoch_started = self.mark[0]
        with _StopFlag() as stop, _closing(lambda: self.bar):
            while step < end:
                self.bar = self.bar or self._progress(step)
                batch = sharding.global_batch(next(train_iter), batch_sharding)
                with jax.transfer_guard("disallow"):
                    state, metrics = train_step(state, batch)
                self.pending.append(metrics)
                if len(self.pending) > 2:  # bound how far dispatch runs ahead of the device
                    jax.block_until_ready(self.pending[-3]["loss"])
                step += 1
                self.bar.update(1)
                stopping = stop.should_stop(step)
                self._checkpoint(step, state, train_iter, forced=stopping or step == end)
                if stopping:
                    break
            self.checkpoints.wait()
        self._print_end(step, stop.signal_name)
        return state

    def _checkpoint(self, step: int, state, train_iter, *, forced: bool) -> None:
        """The log, evaluation and save point after `step`, if it is one (`forced`: save)."""
        epoch_end = step % self.steps_per_epoch == 0 or step == self.total
        every = self.cfg.checkpoint_every
        save = forced or (step % every == 0 if every else epoch_end and self._epoch_save_due())
        if not (save or epoch_end or step % self.log_every == 0):
            return
        row = self._train_row(step)
        saved_metrics = None
        if epoch_end:
            self.bar.close()
            self.bar = None
            result = self.evaluate(state)
            row.update(result)
            self.last_result = result
            saved_metrics = {"test_accuracy": result["test_accuracy"]}
            self._print_epoch(step, row)
        self.run_dir.log(row)
        if save:
            self.checkpoints.save(step, state, train_iter, metrics=saved_metrics)
            self.last_saved, self.last_saved_time = step, time.monotonic()
        self.mark = (time.perf_counter(), step)  # evaluation and saving are not training time

    def _train_row(self, step: int) -> dict:
        """The log row of the steps since the last fetch: their mean metrics, the time."""
        train = self._check_finite(self.pending)
        self.pending, self.first = [], step
        now = time.perf_counter()
        since, since_step = self.mark
        images = (step - since_step) * self.cfg.batch_size
        row = {"step": step, "epoch": step / self.steps_per_epoch, "lr": train.pop("lr")}
        row.update({f"train_{k}": v for k, v in train.items()})
        row["time"] = now - self.started
        row["images_per_sec"] = images / max(now - since, 1e-9)
        return row

    def _print_epoch(self, step: int, row: dict) -> None:
        if not self.main:
            return
        epochs = math.ceil(self.total / self.steps_per_epoch)
        epoch = math.ceil(step / self.steps_per_epoch)
        row = {k: significant(v) for k, v in row.items()}
        ema = f"  ema acc {row['ema_test_accuracy']:.4f}" if "ema_test_accuracy" in row else ""
        print(
            f"epoch {epoch}/{epochs}  train loss {row['train_loss']:.4f}  "
            f"test loss {row['test_loss']:.4f}  test acc {row['test_accuracy']:.4f}{ema}  "
            f"({time.perf_counter() - self.epoch_started:.1f} s)",
            flush=True,
        )
        self.epoch_started = time.perf_counter()

    def _print_end(self, step: int, signal_name: str | None) -> None:
        if not self.main:
            return
        resume = f"continue with --resume --run-name {self.run_dir.name}"
        if signal_name:
            print(
                f"received {signal_name}: saved a checkpoint at step {step} in "
                f"{self.checkpoints.directory}; {resume}",
                file=sys.stderr,
            )
        elif step < self.total:
            print(
                f"stopped at step {step} of {self.total} (--stop-at-step): saved a checkpoint "
                f"in {self.checkpoints.directory}; {resume}",
                file=sys.stderr,
            )
        elif self.last_result is not None:
            accuracy = significant(self.last_result["test_accuracy"])
            print(f"final test accuracy: {accuracy:.4f}", flush=True)
