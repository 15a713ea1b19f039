# Fresh machine: `make demo` (set up + run the main job on its built-in default) or
# `make test` (set up + run the tests). Both reuse an existing .venv when pyproject.toml
# has not changed since it was built.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup demo test benchmark clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/python -c "import tlray, ray, mlflow, timm, torch"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/python jobs/tune_mnist.py

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

benchmark: setup
	$(VENV)/bin/tlray benchmark ingest

clean-venv:
	rm -rf $(VENV)
