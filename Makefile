# memstudy — the two set-up commands are `make book` and `make test` (see README.md).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install book lab test lint clean

install: $(INSTALLED)

# The venv is rebuilt when the dependencies change; the Jupyter kernel `memstudy` points papermill at it.
$(INSTALLED): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name memstudy --display-name "memstudy (.venv)" >/dev/null
	touch $@

# The default study (Snakemake: only what changed reruns) into runs/default/, then the book of that plan.
book: install
	$(BIN)/memstudy study --plan plans/default.yaml
	$(BIN)/memstudy book --plan plans/default.yaml

# JupyterLab on the step notebooks; the kernel `memstudy` (installed above into the venv) runs them.
# JupyterLab refuses to run as root unless told (containers often run as root).
lab: install
	$(BIN)/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf _build book/notebooks
