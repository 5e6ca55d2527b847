# The two commands of the README's quick start, and what CI runs.
#   make dev   - Postgres + provisioner on this machine, with a demo app and a psql line
#                (REPLICAS=2: two pooler replicas)
#   make test  - every check and test (what .ci/run runs)
#   make deploy-check - the offline checks of deploy/ (part of make test)
#   make bench - the full benchmark (README, "Benchmark") into bench/results/
#   make fuzz  - every fuzz target for FUZZ_SECONDS each (README, "Limits and abuse")

CARGO ?= cargo
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c

.PHONY: dev test deps lint deploy-check bench fuzz fuzz-merge

deps:
	@.ci/install-deps

# REPLICAS=2 starts two pooler replicas sharing one budget.
REPLICAS ?= 1
dev: deps
	$(CARGO) run --quiet --locked -p dataplane-tests --bin devstack -- --replicas $(REPLICAS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# Manifests, Dockerfile, dashboard and alert rules: deploy/check/check.py says what.
deploy-check: deps
	deploy/check/run

# The summary line totals every test binary's result, so the last line says what ran
# (cargo's own last line is the doc-tests', usually "0 passed").
test: deps lint deploy-check
	@mkdir -p target
	$(CARGO) test --workspace --locked 2>&1 | tee target/test.log
	@awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($$(i+1) ~ /^passed/) p += $$i; if ($$(i+1) ~ /^failed/) f += $$i; if ($$(i+1) ~ /^ignored/) s += $$i } } \
	     END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, s }' target/test.log

# Release builds of the pooler and the bench (the bench runs the `pooler` binary beside
# it), then a full run; BENCH_ARGS passes flags, e.g. BENCH_ARGS=--quick.
BENCH_ARGS ?=
bench: deps
	$(CARGO) build --release --locked -p pooler -p bench
	$(CARGO) run --release --locked -p bench -- $(BENCH_ARGS)

# The fuzz targets of fuzz/ (nightly, cargo-fuzz), each for FUZZ_SECONDS, at the lowest
# priority. New inputs go to target/fuzz-corpus/<target>; the committed corpus
# (fuzz/corpus/<target>) only seeds them. A crash lands in fuzz/artifacts/<target>:
# copy it to fuzz/regressions/<target>, where the stable replay test keeps it.
# `make fuzz-merge` adds to the committed corpus only the inputs that reach new code.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= frame_splitter startup_packet scram_client classifier prepared_rewriter
FUZZ_ARGS ?= -max_len=65536 -rss_limit_mb=2048 -timeout=10
FUZZ = cd fuzz && nice -n 19 $(CARGO) +nightly fuzz

fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	@for t in $(FUZZ_TARGETS); do \
	    mkdir -p target/fuzz-corpus/$$t; \
	    echo "== $$t: $(FUZZ_SECONDS) s"; \
	    ( $(FUZZ) run $$t ../target/fuzz-corpus/$$t corpus/$$t -- \
	        -max_total_time=$(FUZZ_SECONDS) $(FUZZ_ARGS) ) || exit 1; \
	done

fuzz-merge:
	@for t in $(FUZZ_TARGETS); do \
	    ( $(FUZZ) run $$t corpus/$$t ../target/fuzz-corpus/$$t -- -merge=1 $(FUZZ_ARGS) ) || exit 1; \
	done
