# Troupe: `make demo` runs the flagship example, `make test` runs every check.
# Both install what is missing first (scripts/install-deps.sh).
#
# Everything builds in one cargo profile (release): each profile has a
# target directory of its own, so a second one would compile RocksDB (about
# 30 minutes on 2 cores) a second time. scripts/one-rocksdb.py checks that
# every command below shares one RocksDB build.

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= /var/tmp/troupe-target
CARGO ?= cargo
DEMO ?= support_desk
# `make demo MODEL_URL=http://127.0.0.1:11434/v1 MODEL=llama3.2` runs the
# flagship on any OpenAI-compatible server (Ollama, vLLM, llama.cpp).
export MODEL_URL MODEL
EXAMPLES := first_agent support_desk doc_pipeline gpu_rush gateway nvml_probe \
	journal_tour durable_agents gpu_leases order_saga storage_tiers mcp_tools typed_answers approvals

# Runs a step and prints how long it took.
timed = @start=$$(date +%s); $(1); rc=$$?; \
	echo "== $(2): $$(( $$(date +%s) - start )) s"; exit $$rc

.PHONY: all deps demo test fmt-check one-rocksdb clippy unit examples book bench first-build-note

all: test

deps:
	@./scripts/install-deps.sh

# Says once, before the first build, what it is doing and how long it takes.
first-build-note:
	@if ! ls "$(CARGO_TARGET_DIR)"/release/build/librocksdb-sys-*/out >/dev/null 2>&1; then \
		echo "First build: compiling RocksDB (C++) and about 400 Rust crates in release."; \
		echo "On 2 cores this takes 30 to 40 minutes (RocksDB alone about 30), once; later runs start in seconds."; \
	fi

demo: deps first-build-note
	@set -e; for ex in $(DEMO); do \
		echo "== example $$ex"; \
		$(CARGO) run -q --release --example $$ex; \
	done

test: deps first-build-note
	$(call timed,$(MAKE) -s fmt-check,fmt)
	$(call timed,$(MAKE) -s one-rocksdb,one RocksDB build)
	$(call timed,$(MAKE) -s clippy,clippy)
	$(call timed,$(MAKE) -s unit,tests)
	$(call timed,$(MAKE) -s examples,examples)
	$(call timed,$(MAKE) -s book,book)
	@echo "make test: all checks passed"

fmt-check:
	$(CARGO) fmt --all -- --check

one-rocksdb:
	@CARGO=$(CARGO) ./scripts/one-rocksdb.py

clippy:
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	# The cluster (feature `cluster`, ractor's cluster configuration).
	$(CARGO) clippy --release -p troupe --features cluster --lib --test cluster -- -D warnings
	$(CARGO) clippy --release -p troupe_cli --features cluster -- -D warnings

# The PostgreSQL journal's tests need a server: a throwaway one on
# 127.0.0.1 runs for the length of the tests (scripts/pg.sh).
unit:
	@set -e; url=$$(./scripts/pg.sh start); trap './scripts/pg.sh stop' EXIT; \
	TROUPE_PG_URL="$$url" $(CARGO) test --release --workspace; \
	TROUPE_PG_URL="$$url" $(CARGO) test --release -p troupe --features cluster --lib --test cluster

# Every example, in quick mode, in a throwaway data directory. Built for
# the whole workspace, as the tests were (same features: nothing rebuilds).
examples:
	@set -e; $(CARGO) build -q --release --workspace --examples; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	for ex in $(EXAMPLES); do \
		start=$$(date +%s); \
		MODEL_URL= "$(CARGO_TARGET_DIR)/release/examples/$$ex" --quick --data-dir "$$tmp/$$ex" >"$$tmp/$$ex.log" 2>&1 \
			|| { cat "$$tmp/$$ex.log"; echo "example $$ex failed"; exit 1; }; \
		echo "== example $$ex (quick): $$(( $$(date +%s) - start )) s"; \
	done

book:
	mdbook build book

# Benchmarks are not part of `make test`: run them on a quiet machine.
bench:
	@set -e; for suite in journal mailbox leases saga sessions gateway tiers; do \
		$(CARGO) run -q --release -p troupe_cli -- bench $$suite; \
	done
	$(CARGO) run -q --release -p troupe_cli --features cluster -- bench cluster
	# Micro-benchmarks beside their raw baselines (benches/, divan).
	$(CARGO) bench --bench mailbox --bench journal
