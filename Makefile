# The interface CI, the README and other tools use: setup, run, demo, test, bench.
PY := .venv/bin/python
HOST ?= 127.0.0.1
PORT ?= 8188
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint run demo bench tiny-models

setup:
	@bash scripts/setup.sh

tiny-models: setup
	@$(PY) -m lumina_turbo.devtools.tiny_models

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The quick loop while editing: lint, then everything but the slow and browser tests.
test-fast: lint
	$(PY) -m pytest -m "not slow and not browser" -q $(PYTEST_ARGS)

run: tiny-models
	$(PY) .comfyui/main.py $$($(PY) -c "import torch; print('' if torch.cuda.is_available() else '--cpu')") \
		--listen $(HOST) --port $(PORT) --disable-api-nodes

demo: tiny-models
	$(PY) -m lumina_turbo.devtools.run_demo

bench: tiny-models
	$(PY) -m benchmarks $(BENCH)
