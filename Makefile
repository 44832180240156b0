# Quick start:  `make demo`  (set up .venv, run the classification and detection demos)
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

# The two demos run side by side, one thread each: on 2 cores the pair takes the time of the longer one.
# The detection demo's lines go to its log and are printed when it ends. A job started with & ignores
# Ctrl-C, so the trap stops it when the demo is interrupted.
DEMO_DET_LOG ?= demo_output/demo_det.log
demo: venv
	@mkdir -p $(dir $(DEMO_DET_LOG))
	@echo "the detection demo runs alongside; its log: $(DEMO_DET_LOG)"
	@$(PY) tools/demo_det.py $(DEMO_DET_ARGS) > $(DEMO_DET_LOG) 2>&1 & det=$$!; \
	trap 'kill $$det 2>/dev/null; echo "demo interrupted; the detection demo was stopped too" >&2; exit 130' INT TERM; \
	$(PY) tools/demo.py $(DEMO_ARGS); cls=$$?; \
	echo; echo "waiting for the detection demo ($(DEMO_DET_LOG)) ..."; \
	wait $$det; status=$$?; cat $(DEMO_DET_LOG); \
	test $$cls -eq 0 && test $$status -eq 0

test: venv
	$(PY) -m pytest $(PYTEST_ARGS) tests

bench: venv
	$(PY) tools/benchmark.py --device cpu

clean:
	rm -rf output demo_output .pytest_cache
