# Quick start:  `make demo`  (set up .venv, run the digits demo)
#               `make test`  (set up .venv, run the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kd-installed
PYTEST_ARGS ?= -q -n 2 --dist worksteal

.PHONY: venv demo test bench clean

$(STAMP): requirements.txt setup.py tools/install_detectron2.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	PYTHON=$(PY) bash tools/install_detectron2.sh
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) tools/demo.py $(DEMO_ARGS)
	$(PY) tools/demo_det.py $(DEMO_DET_ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS) tests

bench: venv
	$(PY) tools/benchmark.py --device cpu

clean:
	rm -rf output demo_output .pytest_cache
