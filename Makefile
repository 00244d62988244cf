# One command for each thing a developer does. Every target sets up what it needs.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
# Debian 13 and 12: what `make deb` builds (make deb SUITE=trixie)
SUITE ?= trixie bookworm
APT_PACKAGES := python3 python3-venv python3-dev gcc pkg-config libsystemd-dev util-linux e2fsprogs \
                qemu-system-x86 qemu-utils ovmf mmdebstrap squashfs-tools zstd shellcheck busybox dmsetup \
                dbus-daemon dbus-bin

.PHONY: setup test test-unit test-vm-all demo demo-dry bench bench-vm bench-vm-detect clean deb

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

test: setup deb             ## the suite CI runs, QEMU guests included (root; minutes under TCG)
	$(PY) -m pytest -q -m "not extended"

test-vm-all: setup deb      ## every QEMU scenario on each suite of SUITE, each writing out/vm/<suite>/<scenario>.json
	KILLCORD_SUITES="$(SUITE)" $(PY) -m pytest -q -m vm tests/vm

test-unit: setup            ## everything but the QEMU guests (seconds)
	$(PY) -m pytest -q -m "not vm"

demo: setup deb             ## the main job: a live system in QEMU, memory filled, stick pulled, what survived
	$(PY) scripts/demo.py

demo-dry: setup             ## on this machine, dry-run: arm on a loop device, remove it, show what fired
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

bench: setup                ## trigger latency benchmarks -> out/bench/latency.json, out/bench/uevent_storm.json
	$(PY) bench/latency.py --out out/bench/latency.json
	$(PY) bench/uevent_storm.py --out out/bench/uevent_storm.json

bench-vm: setup             ## QEMU: unplug to off, the wipe target vs the live initrd side by side (3 runs at 1 and 2 GiB, about 20 minutes) -> out/bench/vm.json
	$(MAKE) deb SUITE=trixie
	$(PY) bench/vm.py --out out/bench/vm.json

bench-vm-detect: setup      ## QEMU: detection and the kexec call after the reference listener (guest clock; idle, squashfs failures, uevent storm; real-time and not, 3 runs each, about 20 minutes) -> out/bench/vm-detect.json
	$(MAKE) deb SUITE=trixie
	$(PY) bench/vm_detect.py --modes realtime normal --out out/bench/vm-detect.json

deb:                        ## Debian packages -> out/deb/<suite>/killcord_<version>_<arch>.deb, SUITE="trixie bookworm" (root; each built and linted in a chroot of its suite)
	bash packaging/build-deb.sh $(SUITE)

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
