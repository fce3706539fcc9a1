"""The README, run: every command and every Python snippet, in README order, from a folder other
than the repository root, so a README that drifts from the code fails CI.

Commands run as written, with only what a test must change: long training runs get a few steps
(`SHORTEN`), the placeholders `/data/imagenet` and `DIR` become a small generated imagefolder and
`model.pt` a golden fixture. A few lines are not run, each with its reason (`NOT_RUN`); a README
command neither run nor listed there fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import FIXTURES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent

NOT_RUN = {
    "make train": "runs sepvit-train's default run (tested by test_train.py through train.py)",
    "make test": "is the test suite itself (CI runs it through .ci/run)",
    'pytest -q -n 2 -m "not slow"': "is a part of the test suite itself",
    "pip install torch==2.13.0": "installs packages (test_make_targets_set_up_this_environment)",
    'pip install -e ".[dev]" -c constraints.txt': "installs packages (same)",
}
# Training commands: the README's flags, then these (later flags win) to keep them short.
SHORT = ["--steps", "4", "--batch-size", "8", "--runs-dir", "runs"]
SHORTEN = {
    "sepvit-train": [*SHORT, "--run-name", "NAME", "--stop-at-step", "2",
                     "--checkpoint-every", "2"],
    "sepvit-train --recipe": [*SHORT, "--model", "testing", "--image-size", "56", "--num-workers",
                              "0", "--run-name", "recipe"],
    "sepvit-train --resume": ["--runs-dir", "runs"],
    "sepvit-train --init-from": [*SHORT, "--run-name", "tuned"],
    "sepvit-train --eval-only": ["--batch-size", "8", "--runs-dir", "runs"],
}  # fmt: skip


def blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced bash and python block, in README order."""
    return re.findall(r"```(bash|python)\n(.*?)```", README, re.S)


def bash_commands(code: str) -> list[str]:
    joined = code.replace("\\\n", " ")
    lines = (line.split("  #")[0].split(" # ")[0].strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def make_imagefolder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")


def command_argv(command: str) -> list[str]:
    argv = shlex.split(command.replace("/data/imagenet", "images").replace(" DIR", " images"))
    key = " ".join(argv[:2]) if len(argv) > 1 and argv[1].startswith("--") else argv[0]
    if argv[0] == "sepvit-train" and "--help" not in argv:
        argv += SHORTEN.get(key, SHORTEN["sepvit-train"])
    return argv


@pytest.mark.slow
def test_every_readme_command_and_snippet_runs(tmp_path):
    workdir = tmp_path / "elsewhere"  # not the repository root
    workdir.mkdir()
    make_imagefolder(workdir / "images")
    shutil.copy(FIXTURES / "two_stage_56.pt", workdir / "model.pt")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "JAX_PLATFORMS": "cpu"}
    env.pop("PYTHONPATH", None)  # what a user has: the installed packages only
    ran = []
    for language, code in blocks():
        if language == "python":
            argv = [sys.executable, "-c", code]
            label = code.splitlines()[0]
        else:
            for command in bash_commands(code):
                if command in NOT_RUN:
                    continue
                argv = command_argv(command)
                run(argv, workdir, env, command)
                ran.append(command)
            continue
        run(argv, workdir, env, label)
    assert any(c.startswith("sepvit-train --resume") for c in ran)
    assert any(c.startswith("convert export") for c in ran)
    assert (workdir / "runs" / "NAME" / "model").is_dir()  # the resumed run finished


def run(argv: list[str], workdir: Path, env: dict, label: str) -> None:
    proc = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"README: {label}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def test_the_readme_lists_no_command_that_is_neither_run_nor_explained():
    commands = [c for lang, code in blocks() if lang == "bash" for c in bash_commands(code)]
    runnable = ("convert ", "sepvit-train", "python -m benchmarks")
    unknown = [c for c in commands if c not in NOT_RUN and not c.startswith(runnable)]
    assert not unknown, f"README commands this test does not know how to run: {unknown}"


def test_make_targets_set_up_this_environment():
    """`make train` / `make test` install with the Makefile's TORCH and constraints.txt."""
    plan = subprocess.run(
        ["make", "-n", "-B", "train", "test"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "pip install -q torch==2.13.0" in plan
    assert 'pip install -q -e ".[dev]" -c constraints.txt' in plan
    assert "sepvit-train" in plan and "pytest -q -n 2" in plan
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("exec make test")
