# dps-station: `make demo` runs the end-to-end demo, `make test` runs every check CI runs.
SHELL := /bin/bash
CARGO ?= cargo
# System packages the build and the tests need (Debian names).
PKGS := libtss2-dev libtss2-tcti-swtpm0 libtss2-tcti-device0 swtpm swtpm-tools gnutls-bin tpm2-tools socat \
        pkg-config openssl libudev-dev ca-certificates systemd python3 coreutils binutils dpkg-dev

.PHONY: all deps build test demo bench fmt clippy fuzz soak deb test-deb

all: build

# Install whatever system packages are missing (apt-get as root, or through sudo).
deps:
	@missing=""; for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

build: deps
	$(CARGO) build --bins

fmt:
	$(CARGO) fmt --all -- --check

clippy: deps
	$(CARGO) clippy --all-targets -- -D warnings

test: deps fmt clippy
	$(CARGO) test --lib --bins --tests -- --test-threads=2
	@# The Debian package, built from the debug binaries just tested, installed and removed.
	@if [ "$$(id -u)" = 0 ]; then \
	  deb=$$(DEB_NO_BUILD=1 DEB_PROFILE=dev scripts/deb.sh 2>/dev/null | tail -n1) && \
	  FORCE=1 DEB="$$deb" scripts/test-deb.sh; \
	else echo "test-deb: skipped (needs root for dpkg -i; run 'sudo make test-deb')"; fi

# `make demo DEMO_ARGS=--keep-running` keeps the operator page up until Ctrl-C.
demo: deps
	$(CARGO) build --bins
	./target/debug/dps-station demo $(DEMO_ARGS)

# Benchmarks against their baselines; writes BENCHMARKS.md (release build).
bench: deps
	scripts/bench.sh

# The long property-fuzzing run (PROPTEST_CASES, default 20000).
fuzz: deps
	scripts/fuzz.sh

# The long crash campaign (>= 2,000 boards, >= 20 kill -9), release build.
soak: deps
	scripts/soak.sh

# The Debian package (cargo-deb; installed on first use).
deb: deps
	scripts/deb.sh

# Build, install (dpkg -i), check and remove the package; needs root.
test-deb: deps
	scripts/test-deb.sh
