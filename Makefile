# make report   the main job (sets up .venv and the data first)
# make test     the tests (sets up .venv and the data first)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rqlab-setup
PIP_INSTALL := $(BIN)/python -m pip install -q

# The default report (reports/default.yaml, quick profile) into reports/out/index.html.
REPORT_CMD = $(BIN)/rqlab report --profile quick --out reports/out

.PHONY: setup data test report

setup: $(STAMP)

# Re-runs only when requirements.txt or pyproject.toml change.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements.txt
	$(PIP_INSTALL) --no-deps -e .
	touch $@

data: setup
	$(BIN)/rqlab data fetch fashion-mnist

test: setup data
	$(BIN)/python -m pytest

report: setup data
	$(REPORT_CMD)
