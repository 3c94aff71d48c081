# make report   the main job (sets up .venv and the data first)
# make test     the tests (sets up .venv and the data first)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rqlab-setup
PIP_INSTALL := $(BIN)/python -m pip install -q

# What `make report` runs; a later issue replaces it with the real report.
REPORT_CMD = $(BIN)/rqlab train --model smallcnn --data fashion-mnist --epochs 2 --out runs/default

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
