# One command for each thing a developer does. Every target sets up what it needs.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
APT_PACKAGES := python3 python3-venv python3-dev gcc pkg-config libsystemd-dev util-linux e2fsprogs

.PHONY: setup test demo bench clean

$(VENV)/.installed: pyproject.toml
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	fi
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed   ## system packages (root) + .venv with killcord and its test tools

test: setup                 ## the whole suite (root: loop devices, PID namespaces, slabinfo)
	$(PY) -m pytest -q

demo: setup                 ## dry-run demo: arm on a loop device, pull it, show what fired
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

bench: setup                ## trigger latency benchmark -> out/bench/latency.json
	$(PY) bench/latency.py --out out/bench/latency.json

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
