# Two entry points for a fresh machine (see README.md):
#   make demo   - create .venv if needed, then run the whole consortium on this machine
#   make test   - create .venv if needed, then lint, type-check, check protos and the
#                 dashboard, install Prometheus and iproute2 if missing (for their tests), run pytest
# The interpreter the venv is made from: Debian's python3.11 where it is installed with
# its venv module (3.11.2 or later, the oldest tested), else the first python3 on PATH.
# Debian's is a static build optimised with PGO and LTO; the pyenv Python 3.11 first on
# PATH on this project's machines is built with --enable-shared and without
# --enable-optimizations. Measured side by side, alternating, on 2 cores: the same test
# module took 18 to 20% less CPU on Debian's (test_federated_job 79 and 75 CPU-s against
# 91 and 95; test_pretrain_job, Ray's processes included, 47 and 47 against 59 and 60).
# `make PYTHON=...` picks another; an existing .venv is kept whatever it was made from.
DISTRO_PYTHON := /usr/bin/python3.11
PYTHON ?= $(shell $(DISTRO_PYTHON) -c 'import ensurepip, sys, venv; assert sys.version_info >= (3, 11, 2)' >/dev/null 2>&1 && echo $(DISTRO_PYTHON) || echo python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# pytest-xdist workers: integration tests mostly wait on real processes (restarts,
# heartbeats, rounds), so three share two cores. Measured on 2 cores, the same CPU work
# (about 955 CPU-s) took 619 s with two workers, cores 77% busy, and 551 s with three,
# 87% busy. Three had once made Ray workers miss their start deadlines; that was before
# test_ray_channel stopped leaving Ray nodes spinning against a restarted GCS, and five
# full runs with three have passed since.
# --dist loadfile keeps each module in one worker, so a module-scoped stack starts
# once (loadgroup's xdist_group marks are not honoured under pytest 9.2 with xdist 3.8:
# the @group suffix never reaches the scheduler). --no-loadscope-reorder keeps the
# modules in collection order, which tests/conftest.py sorts longest first from
# tests/durations.json; xdist's default order (most tests first) started the long
# one-test modules (chaos, supervision, multi-host) last, while the other worker idled.
PYTEST_WORKERS ?= 3
XDIST := -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: demo test test-under-load lint checks typecheck pytest protos dashboard durations cpu-by-module

# The pinned torch comes from pip, which finds this machine's CPU wheel on disk (uv does
# not look there, and PyPI's torch is a CUDA build of several GB); everything else from
# uv, which installs the rest in seconds where pip took two minutes. The torch pin is
# read from pyproject.toml, so it is written once.
TORCH_PIN := $(shell grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')

# Bytecode: a process writes the .pyc of each module it finds uncompiled, so a module is
# compiled by the first processes that import it, and only if something does. Where
# PYTHONDONTWRITEBYTECODE is set (as on CI) each of the hundreds of processes the tests
# start would compile its imports again, so make runs its commands without it. Compiling
# all of site-packages up front (uv --compile-bytecode, then compileall for what pip
# installed) took 30 of the set-up's 42 s on 2 cores, mostly on modules nothing imports.
# Ray and the project are still compiled here: as root, Ray's processes run as the pool
# user (consortium/sandbox.py), who cannot write into the venv, and Ray's agents import
# modules no root process does. So are the aggregation kernels (numba, 3.5 CPU-s): the
# processes that would each compile them before the first one cached them, and the
# pretraining drivers, which get a copy (consortium/aggregation/kernel_cache.py), load them.
unexport PYTHONDONTWRITEBYTECODE
PURELIB = $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

$(STAMP): pyproject.toml examples/tiny_workload/pyproject.toml examples/hf_lora/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile 'uv==0.12.24' '$(TORCH_PIN)'
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]' -e examples/tiny_workload -e examples/hf_lora
	$(BIN)/python -m compileall -q -j 0 "$(PURELIB)/ray" consortium coordinator client
	$(BIN)/python -m consortium.aggregation.kernel_cache
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/coordinator demo

lint: checks typecheck

# Everything but mypy: a second or two.
checks: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/python scripts/gen_spec_reference.py --check
	$(BIN)/python -m deploy.grafana.build --check

typecheck: $(STAMP)
	$(BIN)/mypy

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

dashboard: $(STAMP)
	$(BIN)/python -m deploy.grafana.build

# The checks (seconds) and mypy (about 20 s of one core) run beside pytest, whose
# workers often wait on the processes they started; any of them failing fails the target.
test: $(STAMP)
	bash scripts/ensure-test-packages.sh
	$(MAKE) --no-print-directory -j3 checks typecheck pytest

pytest: $(STAMP)
	$(BIN)/pytest $(XDIST)

# The suite beside two spinning processes and an fsync-heavy writer (tests/load.py):
# it must hold on a busy machine too.
test-under-load: $(STAMP)
	CONSORTIUM_TEST_LOAD=2 $(BIN)/pytest $(XDIST)

# Measure every test module again and rewrite tests/durations.json, which orders the
# modules longest first (tests/conftest.py): run after adding or slowing a long module.
# What each test module costs in CPU, with every process it starts (tests/cpu_by_module.py;
# needs root): one JSON line per module in .cpu-by-module.jsonl, the costliest printed.
cpu-by-module: $(STAMP)
	CONSORTIUM_CPU_BY_MODULE=.cpu-by-module.jsonl $(BIN)/pytest $(XDIST) -p no:cacheprovider

durations: $(STAMP)
	$(BIN)/pytest $(XDIST) -p no:cacheprovider --junitxml=.durations.xml
	$(BIN)/python scripts/test_durations.py .durations.xml
	rm -f .durations.xml
