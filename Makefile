# dps-station: `make demo` runs the end-to-end demo, `make test` runs every check CI runs.
SHELL := /bin/bash
CARGO ?= cargo
# System packages the build and the tests need (Debian names).
PKGS := libtss2-dev swtpm swtpm-tools tpm2-tools socat pkg-config openssl libudev-dev ca-certificates systemd

.PHONY: all deps build test lint unit demo bench fmt clippy

all: build

# Install whatever system packages are missing (apt-get as root, or through sudo).
deps:
	@missing=""; for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

build: deps
	$(CARGO) build --bins

fmt:
	$(CARGO) fmt --all -- --check

clippy: deps
	$(CARGO) clippy --all-targets -- -D warnings

test: deps fmt clippy
	$(CARGO) test --all-targets -- --test-threads=4

demo: deps
	$(CARGO) build --bins
	./target/debug/dps-station demo

bench: deps
	$(CARGO) run --release --bin dps-station -- bench
