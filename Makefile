# defectflow: `make demo` and `make test` work on a fresh machine with Python 3.11 and make.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# CPU TensorFlow by default; `make install EXTRA=gpu` installs the CUDA build instead.
EXTRA ?= cpu
PORT ?= 3000
# pytest-xdist workers of `make test`: the 2 cores of CI. Each worker has its own data dir and
# Prefect server; a test file runs whole on one worker, in order (--dist loadfile), so its
# module-scoped fixtures are shared as in a plain run; tests/helpers_schedule.py sends the
# heaviest files first and keeps the container-engine files together.
TEST_WORKERS ?= 2

# All state stays in the project data dir, telemetry off (see src/defectflow/environment.py).
export DEFECTFLOW_HOME ?= $(CURDIR)/.defectflow
export PREFECT_HOME ?= $(DEFECTFLOW_HOME)/prefect
export BENTOML_HOME ?= $(DEFECTFLOW_HOME)/bentoml
export KERAS_HOME ?= $(DEFECTFLOW_HOME)/keras
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export BENTOML_DO_NOT_TRACK := true
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: install demo test test-fast lint clean reproduce host-packages up down

$(VENV)/.installed-$(EXTRA): pyproject.toml
	@[ -x "$(BIN)/python" ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRA),docker,dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

# The Data Docs' scripts, stylesheets and fonts (Bootstrap, jQuery, bootstrap-table, Vega, Font
# Awesome, ...): the npm packages pinned by data-docs-assets/package-lock.json, installed by `npm ci`;
# every Data Docs build copies them into its site, so the pages work without internet
# (src/defectflow/data/data_docs_assets.py). npm comes from Debian (nodejs, npm) when missing.
DOCS_ASSETS := data-docs-assets/node_modules/.package-lock.json
$(DOCS_ASSETS): data-docs-assets/package.json data-docs-assets/package-lock.json
	@command -v npm > /dev/null || { [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; \
	  echo "apt-get install nodejs npm"; $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  $$SUDO apt-get install -y -qq --no-install-recommends nodejs npm > /dev/null; }
	cd data-docs-assets && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	@touch $@

install: $(VENV)/.installed-$(EXTRA) $(DOCS_ASSETS)

demo: install
	@start=$$(date +%s); \
	$(BIN)/defectflow data synth --config demo; \
	$(BIN)/defectflow train --config demo; \
	sample=$$(ls $(DEFECTFLOW_HOME)/data/synthetic/capsule/test/crack/*.png | head -n 1); \
	$(BIN)/defectflow serve --port $(PORT) > $(DEFECTFLOW_HOME)/demo-serve.log 2>&1 & server=$$!; \
	trap 'kill $$server 2>/dev/null; wait $$server 2>/dev/null || true' EXIT; \
	echo "waiting for the Bento on http://127.0.0.1:$(PORT) (log: $(DEFECTFLOW_HOME)/demo-serve.log)"; \
	for i in $$(seq 1 180); do curl -sf http://127.0.0.1:$(PORT)/readyz > /dev/null && break; \
	  kill -0 $$server 2>/dev/null || { cat $(DEFECTFLOW_HOME)/demo-serve.log; exit 1; }; sleep 1; done; \
	echo "POST /predict $$sample"; \
	curl -sf -F "image=@$$sample" http://127.0.0.1:$(PORT)/predict > $(DEFECTFLOW_HOME)/demo-prediction.json; \
	$(BIN)/python -c 'import json,sys; r=json.load(open(sys.argv[1])); m=r["mask_png_base64"]; r["mask_png_base64"]=m[:48]+"... (%d chars)"%len(m); print(json.dumps(r, indent=2))' $(DEFECTFLOW_HOME)/demo-prediction.json; \
	echo "full answer: $(DEFECTFLOW_HOME)/demo-prediction.json"; \
	echo "demo finished in $$(( $$(date +%s) - start )) s"

# `make reproduce CATEGORY=capsule` (or pill): the default recipe (configs/default.yaml, the
# one every category gets) tuned once, then trained and evaluated on 3 split seeds of the MVTec
# AD copy in ../shared; prints the mean ± std table with each stage's wall time and records it
# as docs/results/$(CATEGORY).json and .md, beside the published figures (docs/results.md).
# DATA_ROOT=/path/to/folder runs another folder in MVTec AD layout under the name CATEGORY.
CATEGORY ?=
DATA_ROOT ?= ../shared/data/mvtec_$(CATEGORY)/$(CATEGORY)
SEEDS ?= 42 43 44
reproduce: install
	@[ -n "$(CATEGORY)" ] || { echo "usage: make reproduce CATEGORY=capsule|pill (data: ../shared/data/mvtec_<category>/<category>)"; exit 2; }
	@[ -d "$(DATA_ROOT)" ] || { echo "no $(DATA_ROOT): nothing to reproduce for $(CATEGORY) (the MVTec AD copy is not on this machine)"; exit 1; }
	out=$(DEFECTFLOW_HOME)/results/$(CATEGORY)-$$(date +%Y%m%d-%H%M%S); \
	/usr/bin/time -v $(BIN)/defectflow reproduce --seeds $(SEEDS) --out $$out data.root=$(abspath $(DATA_ROOT)); \
	$(BIN)/python scripts/results_docs.py add $(CATEGORY) $$out --category $(CATEGORY) \
	  --command "make reproduce CATEGORY=$(CATEGORY)$(if $(filter command line,$(origin SEEDS)), SEEDS='$(SEEDS)')$(if $(filter command line,$(origin DATA_ROOT)), DATA_ROOT=$(DATA_ROOT))"

# What the container, browser and real-data tests need from Debian, installed when missing:
# docker.io and debootstrap (tests/test_container.py starts and stops its own dockerd), chromium
# (the page tests), postgresql (`defectflow up --database postgres`) and docker-compose (compose.yaml). Where they cannot be installed those tests fail, unless
# DEFECTFLOW_ALLOW_MISSING=container,browser,real_data (or all) lets them skip (docs/development.md, "Tests").
HOST_PACKAGES := docker.io:dockerd debootstrap:debootstrap chromium:chromium \
  postgresql:/usr/lib/postgresql/15/bin/pg_ctl docker-compose:docker-compose
host-packages:
	@missing=; for pair in $(HOST_PACKAGES); do package=$${pair%%:*}; binary=$${pair##*:}; \
	  command -v $$binary > /dev/null || [ -x /usr/sbin/$$binary ] || missing="$$missing $$package"; done; \
	if [ -n "$$missing" ]; then \
	  [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; echo "apt-get install$$missing"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	      --no-install-recommends $$missing > /dev/null; } \
	  || echo "could not install$$missing: the tests that need them will fail unless DEFECTFLOW_ALLOW_MISSING allows"; \
	fi

# The orchestration stack (docs/orchestration.md): a Prefect server with its UI,
# the work pools, the deployments of prefect.yaml and a worker; `make down` stops what `up` started.
PREFECT_PORT ?= 4200
up: install
	$(BIN)/defectflow up --port $(PREFECT_PORT)

down:
	@if [ -x "$(BIN)/defectflow" ]; then $(BIN)/defectflow down; else echo "nothing to stop: not installed"; fi

test: install host-packages
	$(BIN)/ruff check src tasks flows tests service.py benchmarks scripts examples
	$(BIN)/lint-imports --no-logo --cache-dir $(DEFECTFLOW_HOME)/import-linter
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25 --cov=defectflow --cov-report=term --cov-report=xml:$(DEFECTFLOW_HOME)/coverage.xml

# The quick tier for iterating: every test marked neither `integration` (no Prefect server,
# Bento, HTTP server, container or browser) nor `slow` (training for about half a minute or
# more). `make test` runs everything.
test-fast: install
	$(BIN)/ruff check src tasks flows tests service.py benchmarks scripts examples
	$(BIN)/lint-imports --no-logo --cache-dir $(DEFECTFLOW_HOME)/import-linter
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not integration and not slow" --durations=10

lint: install
	$(BIN)/ruff check src tasks flows tests service.py benchmarks scripts examples
	$(BIN)/lint-imports --no-logo --cache-dir $(DEFECTFLOW_HOME)/import-linter

clean: down
	rm -rf $(VENV) $(DEFECTFLOW_HOME) data-docs-assets/node_modules

# The serving container (scripts/container.py; docs/serving.md, "Container"): Debian's docker.io and
# debootstrap are installed when missing; dockerd is started for the run when none answers, and
# only that one is stopped again. `make container` packs the production model (`make demo` first).
.PHONY: container container-test container-clean
container: install
	$(BIN)/python scripts/container.py build

container-test: install
	$(BIN)/python scripts/container.py test

container-clean:
	$(PYTHON) scripts/container.py clean

# Beyond one machine (docs/deployment-stack.md). The training image: the project, its pinned
# training dependencies and the Docker worker on the local Debian base (no registry);
# `make image-train VARIANT=gpu` builds the CUDA one for a GPU machine.
.PHONY: image-train stack-up stack-down test-postgres
VARIANT ?= cpu
image-train: install host-packages
	$(BIN)/python scripts/container.py train-image --variant $(VARIANT)

# The production stack of compose.yaml (PostgreSQL, Prefect server + UI, a Docker worker, the
# Bento container of the production model) under the project name defectflow, its data in
# $(DEFECTFLOW_HOME); `make stack-down` stops it and the flow-run containers it started.
STACK_PROJECT ?= defectflow
stack-up: install host-packages
	$(BIN)/python scripts/compose_stack.py up --project $(STACK_PROJECT)

stack-down:
	$(BIN)/python scripts/compose_stack.py down --project $(STACK_PROJECT)

# The orchestration tests once more, with the Prefect servers they start on PostgreSQL
# (Debian's postgresql, a cluster per server under its data dir) instead of SQLite.
test-postgres: install host-packages
	DEFECTFLOW_TEST_DATABASE=postgres $(BIN)/python -m pytest -p no:xdist tests/flows/test_orchestration.py tests/orchestration/test_postgres.py
