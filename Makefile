# hieravid-vllm: the two commands a new user runs (see README.md).
#   make demo   prepare the CPU environment if needed, serve a tiny demo model, ask about a video
#   make test   prepare the CPU environments if needed, run the whole test suite on vLLM 0.32,
#               then the vLLM-integration tests marked `vllm033` on vLLM 0.33
PY := .venv/bin/python
PY033 := .venv-vllm033/bin/python
MODEL ?=
DEMO_ARGS ?=
# VLLM033=0 skips the vLLM 0.33 part of `make test`; PYTEST_ARGS applies to the 0.32 part,
# PYTEST_ARGS_033 to the 0.33 part (added to `-m vllm033`)
VLLM033 ?= 1
PYTEST_ARGS_033 ?=

.PHONY: env env-vllm033 demo test test-vllm032 test-vllm033 clean-env

env:
	@bash scripts/setup_env.sh

env-vllm033: env
	@bash scripts/setup_env_vllm033.sh

demo: env
	@HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(PY) -m hieravid_vllm.demo $(if $(MODEL),--model $(MODEL)) $(DEMO_ARGS)

test: test-vllm032
ifneq ($(VLLM033),0)
	@$(MAKE) --no-print-directory test-vllm033
endif

test-vllm032: env
	@$(PY) -m pytest $(PYTEST_ARGS)

# The same tests, selected by the marker, on vLLM 0.33's Python (the CPU build of 0.32's ops,
# see scripts/setup_env_vllm033.sh). PYTEST_ARGS_033 narrowing it to nothing (exit 5) is no error.
test-vllm033: env-vllm033
	@echo "[make test] vLLM 0.33: tests marked vllm033" >&2
	@VLLM_TARGET_DEVICE=cpu $(PY033) -m pytest -m vllm033 $(PYTEST_ARGS_033); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "[make test] vLLM 0.33: no vllm033 test selected" >&2; rc=0; fi; \
	  exit $$rc

clean-env:
	rm -rf .venv .venv-vllm033
