# Two commands do all the set-up: `make lab` (JupyterLab on the course) and `make test`
# (the whole test suite, notebooks included, in quick mode). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: lab test test-full export check notebooks benchmarks clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# --allow-root only when run as root (containers), where JupyterLab otherwise refuses to start.
lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

# STRAWBERRY_QUICK=1 shrinks every notebook's training runs so the suite takes minutes on a CPU.
test: $(VENV)/.installed
	STRAWBERRY_QUICK=1 $(PY) -m pytest

test-full: $(VENV)/.installed
	$(PY) -m pytest

export: $(VENV)/.installed
	$(PY) tools/export.py

check: $(VENV)/.installed
	$(PY) tools/export.py --check

# Re-execute notebooks in place (full mode) so their committed outputs are fresh, then export.
notebooks: $(VENV)/.installed
	$(PY) tools/run_notebooks.py notebooks/*.ipynb

# The full benchmark runs behind notebook 09 (about 1.5 hours on 2 CPU cores); they overwrite
# benchmarks/results/, which the notebook plots. Keep the machine otherwise idle while they run.
RESULTS := benchmarks/results
benchmarks: $(VENV)/.installed
	$(PY) -m benchmarks.generation --out $(RESULTS)/generation.json
	$(PY) -m benchmarks.training_cost --out $(RESULTS)/training_cost.json
	$(PY) -m benchmarks.quality --budget 120 --seeds 2 --out $(RESULTS)/quality.json
	$(PY) -m benchmarks.quality --steps 200 --seeds 2 --out $(RESULTS)/quality_steps.json

clean:
	rm -rf $(VENV) .pytest_cache
