# `make test` and `make demo` each create .venv (if missing) and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/mnist
# Tests run on 8 fake CPU devices so the sharding code paths run on a laptop.
TEST_XLA_FLAGS := --xla_force_host_platform_device_count=8

STUDY_WORKDIR ?= workdir/study

.PHONY: install install-aot test test-fast lint format demo study study-records clean

# EXTRAS picks what `make install` adds: `dev` (tests, demo, lint) by default; on an
# accelerator `make install EXTRAS=tpu` or `EXTRAS=cuda` (add `,dev` for the test-suite).
EXTRAS ?= dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)

# ruff, then the architecture: the import contracts in pyproject.toml (lint-imports).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The compilers `python -m npp_jax.aot` targets without the hardware: libtpu (TPUs) and
# the CUDA plugin (compile-only NVIDIA GPUs; no driver or CUDA libraries), both pinned to
# the installed jax.
install-aot: install
	JAXV=$$($(PY) -c "import jax; print(jax.__version__)") && \
	$(PY) -m pip install -q "jax[tpu]==$$JAXV" "jax-cuda12-plugin==$$JAXV" "jax-cuda12-pjrt==$$JAXV"

# The tests run on the CPU whatever is installed (JAX_PLATFORMS=cpu: libtpu and the CUDA
# plugin are for compiling only); several processes may load libtpu at once.
TEST_ENV := XLA_FLAGS="$(TEST_XLA_FLAGS)" JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1

# Two workers, handed one test at a time (the slow ones first, tests/conftest.py): xdist's
# default hands each worker a quarter of its share at once, which would give one worker
# every slow test.
XDIST := -n 2 --maxschedchunk=1

# Everything, slow end-to-end tests included (what CI runs).
test: lint
	$(TEST_ENV) $(PY) -m pytest -q $(XDIST) --durations=15

# The quick loop: skip tests marked slow.
test-fast: install
	$(TEST_ENV) $(PY) -m pytest -q $(XDIST) -m "not slow"

# Train through every NPP stage, sample (WORKDIR/samples.png and an ADM-format npz), then
# score the samples with a digit classifier (WORKDIR/eval.json).
demo: install
	$(PY) -m npp_jax.main --config=configs/mnist.py --workdir=$(WORKDIR)
	$(PY) -m npp_jax.main --config=configs/mnist.py --workdir=$(WORKDIR) --config.mode=sample
	$(PY) -m npp_jax.main --config=configs/mnist.py --workdir=$(WORKDIR) --config.mode=eval

# NTP against NPP (patch levels 2 and 3) and NTP for NPP-3's FLOPs at the demo's length (34
# epochs), two seeds, quality judged over training; writes STUDY_WORKDIR/study.{json,md,png}.
# Resumable, and a run with a record is not trained again (README: "Does NPP help?").
study: install
	$(PY) -m npp_jax.study --config=configs/study_mnist.py --workdir=$(STUDY_WORKDIR) $(STUDY_ARGS)

# The published tables and figure from the run records kept in docs/study_mnist/records,
# training nothing (runs without a record are left out; `make study` with
# STUDY_ARGS=--config.study.records=docs/study_mnist/records trains them).
study-records: install
	$(PY) -m npp_jax.study --config=configs/study_mnist.py --workdir=$(STUDY_WORKDIR) \
	  --config.study.records=docs/study_mnist/records --config.study.train=False

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
