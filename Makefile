# The two commands of the README's quick start, and what CI runs.
#   make dev   - Postgres + provisioner on this machine, with a demo app and a psql line
#                (REPLICAS=2: two pooler replicas)
#   make test  - every check and test (what .ci/run runs)
#   make deploy-check - the offline checks of deploy/ (part of make test)
#   make bench - the full benchmark (README, "Benchmark") into bench/results/

CARGO ?= cargo
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c

.PHONY: dev test deps lint deploy-check bench

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
