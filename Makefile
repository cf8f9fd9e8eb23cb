# nsm — the two commands a new machine needs:
#   make run    build and run the pipeline on its embedded default (in-process broker + demo stream,
#               three weeks of history, event time 1008x faster, Prometheus with the generated rules
#               on localhost:9090); make run PRODUCT=chatbot|collaboration|marketplace picks the
#               product (default collaboration), make run SCENARIO=healthy|nsm-flattens|
#               guardrail-breach|traffic-stops|collapse|tracking-breaks how its stream changes over
#               time (default healthy); SCENARIO_PERIOD=10m how fast
#   make test   install what the tests need (system packages, the tansu broker) and run them all
#   make fuzz   fuzz event decoding and Engine::apply for FUZZ_SECONDS (nightly + cargo-fuzz)
#   make alert-report  run the alerting scenario library and write its confusion table
#               (what paged, and when) into BENCHMARKS.md
#   make bench  measure the core path against parse-only, memory at BENCH_USERS distinct users,
#               and nsm on tansu against a bare consumer and a Quix Streams peer (throughput,
#               CPU, restart, freshness), in release mode, and write BENCHMARKS.md

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

# How long `make fuzz` runs; the seed corpus is fuzz/corpus/apply, crashes land in
# fuzz/artifacts/apply.
FUZZ_SECONDS ?= 60

# Sizes of `make bench`: events of the core-path runs, distinct users of the memory run.
BENCH_EVENTS ?= 1000000
BENCH_USERS ?= 5000000
# Events of the end-to-end run on tansu (its state is the one the restart is timed with).
BENCH_E2E_EVENTS ?= 10000000
# Events of the two shorter end-to-end runs that show what the repartition topic costs: with
# it, and with the teams counted per partition.
BENCH_REPARTITION_EVENTS ?= 1000000
BENCH_DIR := target/bench
# The Quix Streams peer's Python: a venv of its pinned requirements, made by `make bench` once
# (and again when the requirements change); `make test` never needs it.
QUIX_VENV := $(BENCH_DIR)/quix-venv
QUIX_REQUIREMENTS := crates/nsm-bench/quix/requirements.txt
# The peer reads 3,000 to 4,000 events/s here, so it reads a shorter stream of the same
# shape: BENCH_QUIX_EVENTS events (about 5 minutes). BENCH_QUIX=no skips it (and its venv).
BENCH_QUIX ?= yes
BENCH_QUIX_EVENTS ?= 1000000
QUIX_WANTED := $(filter yes,$(BENCH_QUIX))

.PHONY: run test deps tansu build check fmt lint clean fuzz cargo-fuzz bench quix-venv alert-report

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

# Fuzzing needs a nightly toolchain (libFuzzer's sanitizer flags) and cargo-fuzz; the fuzz crate
# is outside the workspace and builds nsm-core only. New inputs that reach new code go to a
# scratch corpus so the seed corpus in the repository stays small; copy a finding into
# fuzz/corpus/apply once it is fixed, and the stable test crates/nsm-core/tests/hostile.rs
# replays it in `make test`. No sanitizer: the workspace forbids unsafe code, and AddressSanitizer
# would cost three quarters of the executions.
fuzz: cargo-fuzz
	@mkdir -p fuzz/target/corpus-apply
	cd fuzz && $(CARGO) +nightly fuzz run apply -O --sanitizer none target/corpus-apply corpus/apply -- \
	  -dict=dict.txt -max_len=8192 -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048

cargo-fuzz:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked

quix-venv: $(QUIX_VENV)/installed

# Debian's python3 makes venvs only with python3-venv (ensurepip) installed.
$(QUIX_VENV)/installed: $(QUIX_REQUIREMENTS)
	@python3 -c 'import ensurepip, venv' 2>/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3-venv >/dev/null; }
	python3 -m venv $(QUIX_VENV)
	$(QUIX_VENV)/bin/pip install -q -r $(QUIX_REQUIREMENTS)
	@touch $@

# Each measurement prints one JSON line; the report turns them into BENCHMARKS.md. The memory
# runs are separate processes, so each peak RSS is its own.
bench: deps tansu $(if $(QUIX_WANTED),quix-venv)
	$(CARGO) build --release --workspace
	@mkdir -p $(BENCH_DIR)
	@bin=$$($(CARGO) metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/nsm-bench; \
	set -eo pipefail; : > $(BENCH_DIR)/results.jsonl; \
	$$bin core --events $(BENCH_EVENTS) | tee -a $(BENCH_DIR)/results.jsonl; \
	$$bin memory --users $(BENCH_USERS) --store rocksdb | tee -a $(BENCH_DIR)/results.jsonl; \
	$$bin memory --users $(BENCH_USERS) --store rocksdb --metrics every-kind | tee -a $(BENCH_DIR)/results.jsonl; \
	$$bin memory --users $(BENCH_USERS) --store memory | tee -a $(BENCH_DIR)/results.jsonl; \
	$$bin e2e --events $(BENCH_E2E_EVENTS) $(if $(QUIX_WANTED),--quix-python $(abspath $(QUIX_VENV))/bin/python --quix-events $(BENCH_QUIX_EVENTS)) | tee -a $(BENCH_DIR)/results.jsonl; \
	for repartition in on off; do \
	  $$bin e2e --events $(BENCH_REPARTITION_EVENTS) --repartition $$repartition | tee -a $(BENCH_DIR)/results.jsonl; \
	done; \
	$$bin report --results $(BENCH_DIR)/results.jsonl \
	  --command "make bench BENCH_EVENTS=$(BENCH_EVENTS) BENCH_USERS=$(BENCH_USERS) BENCH_E2E_EVENTS=$(BENCH_E2E_EVENTS) BENCH_REPARTITION_EVENTS=$(BENCH_REPARTITION_EVENTS) BENCH_QUIX=$(BENCH_QUIX) BENCH_QUIX_EVENTS=$(BENCH_QUIX_EVENTS)"

# The alerting confusion table: every scenario of the promtool scenario library against every
# example config's generated rules (about 5 minutes on 2 cores), what paged and when, written
# into BENCHMARKS.md (its own section, which `make bench` keeps).
alert-report: deps
	@mkdir -p $(BENCH_DIR)
	NSM_ALERT_REPORT=$(abspath $(BENCH_DIR))/alert-report.md $(CARGO) test --workspace --test promtool scenario_library_against_every_example_config
	$(CARGO) run --bin nsm-bench -- alerts --table $(BENCH_DIR)/alert-report.md

clean:
	$(CARGO) clean
