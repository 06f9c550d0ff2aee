# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench gpu-check lint clean venv

venv: $(STAMP)

# torch first and pinned: on these machines 2.13.0 is a local CPU wheel, while a bare
# `torch` requirement would pull a multi-GB CUDA build. pyproject keeps a range for GPU users.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,hf,dev,megatron]'
	touch $(STAMP)

# The DPO example end to end on the CPU. Each run gets its own output directory; give the
# RUN_ID of an earlier run to resume it from its last checkpoint instead.
RUN_ID ?= $(shell date +%Y%m%d-%H%M%S)
run: $(STAMP)
	OUTPUT_DIR=output/$(RUN_ID) PYTHONPATH=. $(PY) -m examples.dpo.train_dpo -c examples/dpo/dpo.yaml

# Two workers (most tests wait on processes they start), then the tests that assert a
# wall-clock bound alone, so that another test's load cannot make them miss it. With
# PYTHONDONTWRITEBYTECODE set (as on these machines) every Python process the tests start
# compiled chatlearn's sources again (0.1 s of CPU an actor, 0.3 s a coordinator), so the tests
# keep the bytecode cache (__pycache__, ignored by git).
test: export PYTHONDONTWRITEBYTECODE :=
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal -m 'not serial'
	$(PY) -m pytest -q -m serial

# The figures of BENCHMARKS.md, each benchmark measuring its variants side by side.
bench: $(STAMP)
	$(PY) -m chatlearn.cli bench transport
	$(PY) -m chatlearn.cli bench pipeline
	$(PY) -m chatlearn.cli bench pipeline --soak
	$(PY) -m chatlearn.cli bench dpo

# The CUDA paths on this machine's GPUs, one PASS/FAIL line per check (at most 5 minutes);
# without a GPU it says so and exits 0.
gpu-check: $(STAMP)
	$(PY) -m chatlearn.cli gpu-check

lint: $(STAMP)
	$(VENV)/bin/ruff check chatlearn tests examples
	$(VENV)/bin/ruff format --check chatlearn tests examples
	$(VENV)/bin/mypy chatlearn

clean:
	rm -rf $(VENV) build *.egg-info
