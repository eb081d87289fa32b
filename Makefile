# The two commands of the README: `make quickstart` and `make test`.
# Each bootstraps .venv itself. Torch is installed first from TORCH_SPEC so that CPU
# machines get the CPU wheel; GPU users override it, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint quickstart clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# The whole product on the embedded default: local Ray, MLflow in runs/mlflow.db, data/.
quickstart: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/hip quickstart

test: $(STAMP)
	$(BIN)/ruff check .
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest --durations=15

clean:
	rm -rf $(VENV) runs data .pytest_cache
