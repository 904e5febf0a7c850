# The interface CI, the README and other tools use (see shared DESIGN.md "Make targets").
PY := .venv/bin/python
HOST ?= 127.0.0.1
PORT ?= 8188
PYTEST_ARGS ?=

.PHONY: setup test lint run demo bench tiny-models

setup:
	@bash scripts/setup.sh

tiny-models: setup
	@$(PY) -m lumina_turbo.devtools.tiny_models

lint: setup
	$(PY) -m ruff check .

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

run: tiny-models
	$(PY) .comfyui/main.py $$($(PY) -c "import torch; print('' if torch.cuda.is_available() else '--cpu')") \
		--listen $(HOST) --port $(PORT) --disable-api-nodes

demo: tiny-models
	$(PY) -m lumina_turbo.devtools.run_demo

bench: tiny-models
	$(PY) -m benchmarks $(BENCH)
