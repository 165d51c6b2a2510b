#!/usr/bin/env bash
# fedslm on a CUDA machine without network: install from carried wheels, run the gpu-marked tests and
# the engine benchmark, and write benchmarks/results/gpu-<date>.json. Finishes in under 8 minutes
# (each phase has its own time limit; their sum is 470 s).
#
#   benchmarks/gpu_check.sh [WHEELS_DIR]        # default: ./wheels beside the project, or $FEDSLM_WHEELS
#
# Preparing the wheels (on a machine with network, same OS, CPU architecture and Python minor version
# as the GPU machine; on Linux x86_64 PyPI's torch wheel is the CUDA build):
#
#   pip wheel --wheel-dir wheels ".[dev]"       # fedslm's own wheel and every dependency, torch included
#   # a specific CUDA build instead: pip download --dest wheels --no-deps torch==2.13.0 \
#   #     --index-url https://download.pytorch.org/whl/cu128   (then pip wheel as above)
#
# then copy the project folder and wheels/ to the GPU machine and run this script there. It installs with
# `pip install --no-index --find-links WHEELS` into .venv-gpu (or $VENV), never touching the network,
# and tests the checkout's code (PYTHONPATH). Without wheels it uses $PYTHON (or .venv-gpu) as it is.
# Without a CUDA device it says so in one line and exits with status 2, having run nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${1:-${FEDSLM_WHEELS:-$ROOT/wheels}}"
VENV="${VENV:-$ROOT/.venv-gpu}"
QUICK="${GPU_CHECK_QUICK:-1}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
SECONDS=0

say() { printf 'gpu_check: %s\n' "$*" >&2; }

if [ -d "$WHEELS" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
    say "installing fedslm[dev] from $WHEELS into $VENV (no network)"
    timeout 120 "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "fedslm[dev]" \
        || { say "installing from $WHEELS failed (is fedslm's own wheel there? see this script's header)"; exit 2; }
elif [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x "$VENV/bin/python" ]; then
    PY="$VENV/bin/python"
else
    say "no wheels folder at $WHEELS and no \$PYTHON or $VENV to use; prepare the wheels (see this script's header)"
    exit 2
fi

"$PY" -c "import fedslm, torch" 2>/dev/null || { say "$PY cannot import fedslm and torch"; exit 2; }
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "no CUDA device: torch $("$PY" -c 'import torch; print(torch.__version__)') sees none; nothing was run (a CUDA build of torch and a GPU are needed)"
    exit 2
fi

cd "$ROOT"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

say "gpu-marked tests"
set +e
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu --junitxml="$TMP/gpu-tests.xml" tests/
TESTS_RC=$?
ENGINE_RC=""
if [ -f benchmarks/engine.py ]; then
    say "engine benchmark (benchmarks/engine.py --device cuda --quick)"
    timeout 90 "$PY" benchmarks/engine.py --device cuda --quick
    ENGINE_RC=$?
fi
set -e

say "figures (benchmarks/gpu_check.py)"
ARGS=(--device cuda --tests-junit "$TMP/gpu-tests.xml" --tests-rc "$TESTS_RC")
[ -n "$ENGINE_RC" ] && ARGS+=(--engine-rc "$ENGINE_RC")
[ "$QUICK" = "1" ] && ARGS+=(--quick)
timeout 140 "$PY" benchmarks/gpu_check.py "${ARGS[@]}"
say "done in ${SECONDS} s (gpu tests exit status $TESTS_RC${ENGINE_RC:+, engine benchmark $ENGINE_RC})"
[ "$TESTS_RC" -eq 0 ]
