"""The process entry point of training: `python train.py` and the `sepvit-train` script.

Process-level policy lives here, not in the library (`run.main`, which tests call in-process):
- freed host memory is kept for reuse (`allocator.py`: XLA:CPU's per-step buffers would otherwise
  fault in fresh pages every step);
- a single-process run ends without the interpreter's teardown. At exit JAX destroys its
  backends (compiled programs, the CPU client's thread pools) and Python collects every object:
  ~0.6 s of the 15 s default run, after the run has closed its checkpoints and data workers and
  written everything. A multi-process run exits normally, so that JAX's distributed runtime shuts
  down in step with its peers.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import jax

from sepvit_jax.train.allocator import reuse_freed_memory
from sepvit_jax.train.run import main as run_main


def main(argv: list[str] | None = None) -> NoReturn:
    reuse_freed_memory()  # before the first step
    status = run_main(argv)
    if jax.distributed.is_initialized() or jax.process_count() > 1:
        sys.exit(status)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
