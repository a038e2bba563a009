# `make demo` / `make demo-translation` train baseline vs intra-distillation on real offline data;
# `make test` runs the fast tier of the suite (minutes), `make test-full` all of it (what CI runs).
# Each creates .venv (or uses VENV=...) and installs what it needs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed-$(shell cat requirements/*.txt pyproject.toml setup.py | md5sum | cut -c1-12)

.PHONY: test test-full demo demo-translation bench install dist clean gpu-check gpu-wheels

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	# torch pinned first: the CPU build on local disk (a bare `torch` pulls a multi-GB CUDA build).
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements/test.txt
	$(PIP) install --no-deps -r requirements/no-deps.txt
	$(PIP) install --no-build-isolation --no-deps -e .
	# Compile the C++ extension now rather than inside the first test (it is cached afterwards).
	$(PY) -c "from intradistill_kernels.ops import cpp; ok = cpp.cpu_backend.is_available(); print('C++ cpu backend:', 'built' if ok else cpp.build_error('cpu'))"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# The few-label fine-tuning regime where the baseline overfits (the method's use case), 3 seeds.
demo: $(STAMP)
	$(PY) -m examples.demo.run --out runs/demo

# The full sequence-to-sequence path: 16k German->English pairs, a Transformer trained from scratch.
demo-translation: $(STAMP)
	$(PY) -m examples.translation.demo --out runs/demo-translation

# Every backend against the float64 reference on small shapes, the API and error contract, the
# integrations on tiny models, one ahead-of-time compile, one quick run of each example.
test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider -m "not full" --hypothesis-profile=quick $(PYTEST_ARGS)

# Everything: also the tests marked `full` (the compile matrix, CUDA compile checks, wheel and
# sdist installs, multi-process runs, the concurrent-cache runs) and many more hypothesis draws.
test-full: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider --hypothesis-profile=thorough $(PYTEST_ARGS)

# The sdist and the wheel, both carrying csrc/ (INTRADISTILL_BUILD_EXT=1 also compiles the extension
# into the wheel). build/ goes first: a library left there by an earlier build would enter the wheel.
dist: $(STAMP)
	rm -rf build dist
	$(PY) -c "from setuptools import build_meta; build_meta.build_sdist('dist')"
	$(PIP) wheel --no-deps --no-build-isolation -w dist .

bench: $(STAMP)
	$(PY) -m benchmarks.run --device $(if $(DEVICE),$(DEVICE),cpu)

# On a lent GPU machine (no network; torch, triton, transformers and pytest already there):
#   make gpu-check PY=python3
# The GPU test subset, the benchmark grid and the performance targets in < 8 minutes, written to
# benchmarks/results/<gpu>-<date>/. No venv is made and nothing is fetched: the optional
# contenders (Liger-Kernel, cut-cross-entropy) are installed from $(GPU_WHEELS) when present
# (`make gpu-wheels` on a machine with the registry), into a folder of their own.
GPU_WHEELS ?= .gpu/wheels
GPU_SITE ?= .gpu/site
GPU_PY = $(if $(wildcard $(PY)),$(PY),python3)
GPU_OPTIONAL = liger-kernel==0.8.5 cut-cross-entropy==25.1.1

gpu-check:
	@if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then \
	  $(GPU_PY) -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
	    --target $(GPU_SITE) $(GPU_WHEELS)/*.whl || echo "gpu-check: optional wheels not installed: contenders skipped"; \
	else echo "gpu-check: no $(GPU_WHEELS) (make gpu-wheels): Liger-Kernel and cut-cross-entropy skipped"; fi
	PYTHONPATH=$(CURDIR):$(CURDIR)/$(GPU_SITE) $(GPU_PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# Pure-Python wheels (their only requirements, torch and triton, are on the GPU machine) for its
# Python 3.12 on x86-64.
gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
	  -d $(GPU_WHEELS) $(GPU_OPTIONAL)

clean:
	rm -rf $(VENV) build dist *.egg-info intradistill_kernels/*.so intradistill_kernels/_aot_build.json
