# hieravid-vllm: the two commands a new user runs (see README.md).
#   make demo   prepare the CPU environment if needed, serve a tiny demo model, ask about a video
#   make test   prepare the CPU environment if needed, run the whole test suite
PY := .venv/bin/python
MODEL ?=
DEMO_ARGS ?=

.PHONY: env demo test clean-env

env:
	@bash scripts/setup_env.sh

demo: env
	@HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(PY) -m hieravid_vllm.demo $(if $(MODEL),--model $(MODEL)) $(DEMO_ARGS)

test: env
	@$(PY) -m pytest $(PYTEST_ARGS)

clean-env:
	rm -rf .venv
