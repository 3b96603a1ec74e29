PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# the second megatron-core matrix: the newest release, which needs Python >= 3.12. The first python3.12 that
# runs: on PATH, else pyenv's installed 3.12 (pyenv's shim answers "command not found" unless 3.12 is selected).
PYTHON_LATEST ?= $(firstword $(shell python3.12 -c "" >/dev/null 2>&1 && echo python3.12) \
	$(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/3.12*/bin/python3.12) $(wildcard /usr/bin/python3.12))
VENV_LATEST := .venv-mcore-latest
PY_LATEST := $(VENV_LATEST)/bin/python
# pytest-xdist workers: the suite keeps about one core busy on its own, so two workers use a 2-core machine;
# each test file runs on one worker, and the Slurm test modules take turns (tests/slurm_cluster.py)
TEST_WORKERS ?= 2
# the tests that touch megatron-core: router, model, converter, training, export, self-check, Megatron-LM trainer
MCORE_TESTS := tests/test_mor_math.py tests/settings tests/mcore tests/convert tests/train tests/hf tests/test_selfcheck.py \
	tests/megatron_lm

.PHONY: setup test demo clean setup-latest test-latest

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a looser requirement elsewhere would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,logging]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

demo: setup
	$(PY) -m examples.quickstart.run --output runs/quickstart

# megatron-core 0.19.x on Python 3.12. PyPI has no CPU build of torch for Linux: torch==2.13.0 comes as
# its CUDA build (about 4.7 GB with its libraries), which runs on a CPU.
$(VENV_LATEST)/.installed: setup.py ci/megatron-core-latest.txt
	@test -n "$(PYTHON_LATEST)" || { echo "error: no python3.12 found: the megatron-core 0.19 matrix needs Python >= 3.12 (set PYTHON_LATEST=/path/to/python3.12)" >&2; exit 1; }
	$(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(PY_LATEST) -m pip install -q --upgrade pip
	$(PY_LATEST) -m pip install -q torch==2.13.0
	$(PY_LATEST) -m pip install -q -e ".[test,logging]" -c ci/megatron-core-latest.txt
	touch $@

setup-latest: $(VENV_LATEST)/.installed

test-latest: setup-latest
	$(PY_LATEST) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10 $(MCORE_TESTS)

clean:
	rm -rf $(VENV) $(VENV_LATEST) *.egg-info
