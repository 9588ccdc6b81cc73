#!/usr/bin/env bash
# The one short device check of issue 16, for a session with a GPU machine (JAX and PyTorch
# installed, no TensorFlow, no package index). Run from the repository root:
#   bash bench/gpu_check.sh            # ~5-8 min on one H100/H200; prints RESULT lines
#   bash bench/gpu_check.sh --tiny     # a CPU smoke run of the same path (a minute or two)
# It needs the project's pure-Python dependencies that the machine may lack (pydantic,
# pydantic-settings, boto3/botocore for the in-memory bucket, pandas, scikit-learn): it says
# which one is missing instead of failing half-way.
set -euo pipefail
cd "$(dirname "$0")/.."
export KERAS_BACKEND=jax PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TF_CPP_MIN_LOG_LEVEL=3
PY="${PYTHON:-python3}"
missing=$("$PY" - <<'PY'
import importlib.util
need = ["jax", "keras", "numpy", "pydantic", "pydantic_settings", "botocore", "boto3", "pandas", "sklearn"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "gpu_check: missing Python packages: $missing" >&2
  exit 3
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "no nvidia-smi"
if [ "${1:-}" = "--tiny" ]; then
  exec "$PY" bench/gpu_check.py --tiny "${@:2}"
fi
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
EXTRA=()
if [ "${GPUS:-0}" -gt 1 ]; then EXTRA+=(--data-parallel); fi
exec "$PY" bench/gpu_check.py "${EXTRA[@]}" "$@"
