# nsm — the two commands a new machine needs:
#   make run    build and run the pipeline on its embedded default (in-process broker + demo stream);
#               make run PRODUCT=chatbot|collaboration|marketplace picks the product (default collaboration),
#               make run SCENARIO=healthy|nsm-flattens|guardrail-breach|traffic-stops how its stream
#               changes over time (default healthy); SCENARIO_PERIOD=10m how fast
#   make test   install what the tests need (system packages, the tansu broker) and run them all

SHELL := /bin/bash
CARGO ?= cargo
# Debian packages the build and the tests need: libclang for RocksDB's bindgen, a C++
# toolchain and libssl for librdkafka, Prometheus and promtool for the alerting tests.
APT_PACKAGES := libclang-dev clang libssl-dev pkg-config cmake g++ make prometheus curl
TANSU_VERSION := 0.6.0
CARGO_BIN := $(HOME)/.cargo/bin
export PATH := $(CARGO_BIN):$(PATH)
# The product `make run` simulates, each with its example config in config/.
PRODUCT ?= collaboration
# How the demo stream changes over time, and over how long (see `nsm demo --help`).
SCENARIO ?= healthy
SCENARIO_PERIOD ?= 10m

.PHONY: run test deps tansu build check fmt lint clean

run: deps
	$(CARGO) run --bin nsm -- demo --product $(PRODUCT) --scenario $(SCENARIO) --scenario-period $(SCENARIO_PERIOD)

test: deps tansu
	$(CARGO) test --workspace --all-targets --no-fail-fast

build: deps
	$(CARGO) build --workspace --all-targets

# Format and lint as CI and reviewers expect.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# Installs missing Debian packages (root or sudo needed only when something is missing).
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# tansu: a Kafka-protocol broker in Rust, for the end-to-end tests. Installed once per machine.
tansu:
	@if ! command -v tansu >/dev/null 2>&1 || ! tansu --version 2>/dev/null | grep -q "$(TANSU_VERSION)"; then \
	  echo "installing tansu $(TANSU_VERSION) (about 11 minutes on 2 cores, once per machine)"; \
	  $(CARGO) install tansu --version $(TANSU_VERSION) --locked --features dynostore; \
	fi

clean:
	$(CARGO) clean
