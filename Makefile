# Two commands: `make test` and `make demo`. Both create .venv, install, and start what they need.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PYTEST_ARGS ?=
DEMO_ARGS ?=
SHELL  := /bin/bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: install services peers chromium lint test demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -e '.[test]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import prefect, redis, sqlalchemy, kubernetes, httpx, pytest"
	touch $@

install: $(VENV)/.installed

services:
	bash deployments/ensure-services.sh

# the real peers from Debian: Prometheus + promtool, Alertmanager, the redis and blackbox exporters (the detection
# loop, the alerting tests, the demo's default `--detect prometheus`)
# (each package installs the command of its name; prometheus brings promtool)
PEERS := prometheus prometheus-alertmanager prometheus-redis-exporter prometheus-blackbox-exporter
peers:
	@need=""; for p in $(PEERS); do command -v $$p >/dev/null || need="$$need $$p"; done; \
	if [ -n "$$need" ]; then echo "installing$$need"; S=""; [ "$$(id -u)" -eq 0 ] || S=sudo; \
	  $$S apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $$S apt-get install -y -qq \
	  --no-install-recommends $$need >/dev/null; fi

# the browser test drives Debian's chromium through playwright (never `playwright install`: no downloads)
chromium:
	@command -v chromium >/dev/null || { echo "installing chromium"; S=""; [ "$$(id -u)" -eq 0 ] || S=sudo; \
	  $$S apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $$S apt-get install -y -qq \
	  --no-install-recommends chromium >/dev/null; }

lint: install
	$(VENV)/bin/ruff check flows tasks deployments sandbox bench tests

test: install services peers chromium lint
	$(PY) -m pytest $(PYTEST_ARGS)

# the demo falls back to `--detect direct` (and says so) where the peers cannot be installed
demo: install
	-@$(MAKE) --no-print-directory peers
	NEED_POSTGRES=0 bash deployments/ensure-services.sh
	$(PY) -m deployments.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .fd-demo .fd-demo-*
