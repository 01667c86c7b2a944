# The README's commands. Each creates .venv and installs vimjax on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: demo test test-fast install clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded shapes dataset (CPU, about ten minutes). CPU
# unless JAX_PLATFORMS is set (the test extra installs libtpu, which would
# otherwise probe for a TPU first); `JAX_PLATFORMS= make demo` auto-detects.
demo: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS-cpu} $(PY) -m vimjax.demo --workdir=$(DEMO_DIR)

# The whole test suite on 8 fake CPU devices (tests/conftest.py sets them). Whole files
# per worker, slowest first (the order tests/conftest.py gives; xdist's reorder off).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist=loadfile --no-loadscope-reorder tests

# The edit loop: no training runs, no binaries, no multi-process or libtpu compiles.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist=loadfile --no-loadscope-reorder -m "not slow and not multiprocess and not libtpu" tests

clean:
	rm -rf $(VENV) $(DEMO_DIR)
