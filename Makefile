# Troupe: `make demo` runs the flagship example, `make test` runs every check.
# Both install what is missing first (scripts/install-deps.sh).

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= /var/tmp/troupe-target
CARGO ?= cargo
DEMO ?= support_desk
EXAMPLES := first_agent support_desk doc_pipeline gpu_rush gateway nvml_probe \
	journal_tour durable_agents gpu_leases order_saga storage_tiers

.PHONY: all deps demo test fmt-check clippy unit examples book bench

all: test

deps:
	@./scripts/install-deps.sh

demo: deps
	@set -e; for ex in $(DEMO); do \
		echo "== example $$ex"; \
		$(CARGO) run --release --example $$ex; \
	done

test: deps fmt-check clippy unit examples book
	@echo "make test: all checks passed"

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	# The cluster (feature `cluster`, ractor's cluster configuration) is
	# checked in release: its build scripts' dependencies differ, so it has
	# a RocksDB build of its own, and the cluster test and benchmark run in
	# release too (one RocksDB build instead of two).
	$(CARGO) clippy --release -p troupe --features cluster --lib --test cluster -- -D warnings
	$(CARGO) clippy --release -p troupe_cli --features cluster -- -D warnings

# The PostgreSQL journal's tests need a server: a throwaway one on
# 127.0.0.1 runs for the length of the tests (scripts/pg.sh).
unit:
	@set -e; url=$$(./scripts/pg.sh start); trap './scripts/pg.sh stop' EXIT; \
	TROUPE_PG_URL="$$url" $(CARGO) test --workspace; \
	TROUPE_PG_URL="$$url" $(CARGO) test --release -p troupe --features cluster --lib --test cluster

# Every example, in quick mode, in a throwaway data directory.
examples:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	for ex in $(EXAMPLES); do \
		echo "== example $$ex (quick)"; \
		$(CARGO) run -q --example $$ex -- --quick --data-dir "$$tmp/$$ex"; \
	done

book:
	mdbook build book

# Benchmarks are not part of `make test`: run them on a quiet machine.
bench:
	@set -e; for suite in journal mailbox leases saga sessions gateway tiers; do \
		$(CARGO) run -q --release -p troupe_cli -- bench $$suite; \
	done
	$(CARGO) run -q --release -p troupe_cli --features cluster -- bench cluster
