# iopart: `make demo` and `make test` are the two set-up commands (see README).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# Debian packages the project needs; only the missing ones are installed.
APT_PKGS := gcc make libffi-dev liburing-dev fio nbdkit libnbd-bin qemu-utils iproute2 \
            clang libclang-rt-14-dev qemu-system-common libseccomp2 \
            iputils-ping socat iperf3 libnbd-dev
INSTALLED := $(VENV)/.installed
NATIVE_SRC := $(wildcard native/*.c native/include/*.h) native/build.py native/stamp.py
FUZZ_SECONDS ?= 20

.PHONY: setup apt test lint typecheck pytest demo bench chaos fuzz clean

setup: apt $(INSTALLED)

apt:
	@missing=$$(for p in $(APT_PKGS); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(INSTALLED): pyproject.toml setup.py $(NATIVE_SRC)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

lint: setup
	$(VENV)/bin/ruff check iopart bench tests

typecheck: setup
	$(VENV)/bin/mypy iopart

pytest: setup
	$(VENV)/bin/pytest tests

test: setup lint typecheck pytest

# the full chaos run: 200 faults (kills, hangs, double kills) under verifying guest I/O
chaos: setup
	IOPART_CHAOS_FAULTS=200 $(VENV)/bin/pytest -s tests/test_failover.py -k chaos

fuzz: setup
	bash native/fuzz/run.sh $(FUZZ_SECONDS)

demo: setup
	$(VENV)/bin/iopart demo

bench: setup
	$(VENV)/bin/iopart bench channel
	$(VENV)/bin/iopart bench tx
	$(VENV)/bin/iopart bench disk
	$(VENV)/bin/iopart bench net
	$(VENV)/bin/iopart bench failover

clean:
	rm -rf build bench/peers/build native/fuzz/build iopart/_iop_native*.so iopart/_iop_native.c
