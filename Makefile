# The two commands of a fresh machine (README, "Start here"), from the repository root:
#
#   make train    create .venv and install the project on first use, then train the default
#   make test     the same set-up, then run the test suite (what CI runs: .ci/run)
#
# The set-up is plain venv + pip: `python -m venv .venv`, torch, then `pip install -e ".[dev]"`
# pinned by constraints.txt; it reruns only when pyproject.toml or constraints.txt change.
# TORCH is the PyTorch requirement installed first: on a CPU-only machine elsewhere, ask for a
# CPU build, e.g. make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)

.PHONY: train test
train: $(STAMP)
	$(VENV)/bin/sepvit-train

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2

$(STAMP): pyproject.toml constraints.txt
	@echo "[make] setting up $(VENV) (first use, or pyproject.toml/constraints.txt changed) ..."
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e ".[dev]" -c constraints.txt
	rm -f $(VENV)/.installed-*
	touch $@
