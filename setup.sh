#!/usr/bin/env bash
# Set up mlc in ./.venv. `./setup.sh` installs the tool; `./setup.sh --dev` adds what the tests need.
# Without a GPU, torch is pinned to the CPU wheel so pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch_req="torch>=2.9"
else
  torch_req="torch==${MLC_CPU_TORCH:-2.13.0}"
fi
"${pip[@]}" "$torch_req"
"${pip[@]}" -e ".${extras}" "$torch_req"
"${pip[@]}" -e plugins/mlc-gguf "$torch_req"
echo "mlc is installed in .venv: run .venv/bin/mlc --help" >&2
