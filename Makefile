# make report   the main job (sets up .venv and the data first)
# make test     the tests (sets up .venv and the data first)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rqlab-setup
PIP_INSTALL := $(BIN)/python -m pip install -q

# The default report (reports/default.yaml, quick profile) into reports/out/index.html.
REPORT_CMD = $(BIN)/rqlab report --profile quick --out reports/out

.PHONY: setup chromium data test report

setup: $(STAMP) chromium

# Re-runs only when requirements.txt or pyproject.toml change.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements.txt
	$(PIP_INSTALL) --no-deps -e .
	touch $@

# Debian's chromium for the browser tests (tests/test_browser.py), its own step so that an
# existing .venv is kept: installed with apt-get when missing and run as root; skipped
# quietly otherwise (the browser tests then skip, except on CI, where they fail).
CHROMIUM := /usr/bin/chromium
chromium:
	@if [ ! -x $(CHROMIUM) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the browser tests"; \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >/dev/null \
	    || echo "warning: apt-get could not install chromium: the browser tests will skip"; \
	fi

data: setup
	$(BIN)/rqlab data fetch fashion-mnist

# lint-imports: the layer contract in pyproject.toml (an upward import or a cycle fails)
test: setup data
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

report: setup data
	$(REPORT_CMD)
