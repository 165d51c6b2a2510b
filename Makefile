# fedslm: `make run` and `make test` set everything up themselves (a .venv in this folder).
# torch goes in first, pinned to the CPU build this project is verified with; a GPU user
# installs their own torch into .venv first and it is kept (see README).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.fedslm-installed
RUN_DIR ?= runs/icd10-hospitals-$(shell date +%Y%m%d-%H%M%S)

.PHONY: run train test bench-dp install clean

install: $(STAMP)

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "error: needs Python 3.11 (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "keeping the torch already in $(VENV): $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
		$(BIN)/python -m pip install "$(TORCH_SPEC)"; \
	fi
	$(BIN)/python -m pip install -e ".[dev]"
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/fedslm simulate --config simulations/icd10-hospitals.yaml --out $(RUN_DIR)

train: $(STAMP)
	$(BIN)/fedslm train --config configs/default.yaml output.dir=runs/local-$(shell date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(BIN)/python -m pytest

bench-dp: $(STAMP)
	$(BIN)/python benchmarks/dp_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
