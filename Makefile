# outboxd developer entry points. `make help` lists them.
#
# Services (PostgreSQL + FerretDB) are brought up by scripts/services.sh, which
# prints only `export VAR=...` lines on stdout, so a shell can adopt them with
#   eval "$(make -s services)"

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

# Tools that are often installed outside a non-login shell's PATH.
export PATH := $(PATH):$(HOME)/.cargo/bin:/usr/local/go/bin

CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
OUTBOXD := $(TARGET_DIR)/debug/outboxd
# Tests within a binary run in parallel; more than twice the CPUs only
# tightens every deadline on a 2-core machine.
TEST_THREADS ?= 4

# Extra make targets run at the end of `make test`, with the services'
# environment exported (e.g. `make test TEST_EXTRA="bench-smoke"`). Empty for now.
TEST_EXTRA ?=

# First line of recipes that need the services: starts/checks them and exports
# DATABASE_URL and MONGODB_URL into the (single, .ONESHELL) recipe shell.
WITH_SERVICES = services_env="$$(scripts/services.sh)"; eval "$$services_env"

.PHONY: help services status build migrate run test test-extra clean-services check-ops bench chaos fuzz

help: ## list targets
	@echo "usage: make <target>"
	echo
	grep -E '^[a-zA-Z_-]+:.*## ' $(firstword $(MAKEFILE_LIST)) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'
	echo
	echo 'eval "$$(make -s services)"   sets DATABASE_URL and MONGODB_URL in your shell'

services: ## start PostgreSQL + FerretDB if needed; prints export lines for eval "$(make -s services)" (not to a terminal)
	@scripts/services.sh

status: ## show whether PostgreSQL and FerretDB are answering
	@scripts/services.sh status

build: ## cargo build (debug)
	@$(CARGO) build --locked

migrate: ## services, then apply database migrations
	@$(WITH_SERVICES)
	$(CARGO) run --locked -q -- migrate

run: ## services, migrate, then run ingest + relay in the foreground (Ctrl-C stops both)
	@$(WITH_SERVICES)
	$(CARGO) build --locked
	"$(OUTBOXD)" migrate
	export OUTBOXD_WEBHOOK_SECRET="$${OUTBOXD_WEBHOOK_SECRET:-dev-secret-change-me}"
	# Development: ingest accepts the development (or a short) secret only when told so.
	export OUTBOXD__INGEST__ALLOW_INSECURE_SECRET="$${OUTBOXD__INGEST__ALLOW_INSECURE_SECRET:-true}"
	if [ "$$OUTBOXD_WEBHOOK_SECRET" = dev-secret-change-me ]; then
		echo "make run: NOTE: using the development webhook secret 'dev-secret-change-me';" \
			"set OUTBOXD_WEBHOOK_SECRET for anything real" >&2
	fi
	pids=()
	stop_all() { trap - INT TERM EXIT; kill "$${pids[@]}" 2>/dev/null || true; wait || true; }
	# Ctrl-C reaches both processes already; a second signal would cut their drain short.
	trap 'trap - INT TERM EXIT; wait || true; exit 130' INT
	trap 'stop_all; exit 143' TERM
	trap 'stop_all' EXIT
	"$(OUTBOXD)" ingest & pids+=($$!)
	"$(OUTBOXD)" relay & pids+=($$!)
	echo "make run: ingest (pid $${pids[0]}) and relay (pid $${pids[1]}) running; Ctrl-C stops both" >&2
	# Whichever exits first ends the run; the EXIT trap stops the other.
	wait -n

test: ## services, then fmt check, clippy, and the whole test suite
	@$(WITH_SERVICES)
	export RUST_BACKTRACE=1
	step() { printf '\n==> %s\n' "$$*" >&2; }
	step "cargo fmt --all -- --check"
	$(CARGO) fmt --all -- --check
	step "cargo clippy --locked --all-targets -- -D warnings"
	$(CARGO) clippy --locked --all-targets -- -D warnings
	step "cargo test --locked --all-targets -- --test-threads=$(TEST_THREADS)"
	$(CARGO) test --locked --all-targets -- --test-threads=$(TEST_THREADS)
	step "make check-ops"
	$(MAKE) check-ops
	$(if $(strip $(TEST_EXTRA)),step "make $(TEST_EXTRA)"; $(MAKE) $(TEST_EXTRA))

# Hook: `make test-extra` runs only the extra steps (with services' env).
test-extra: ## run only the TEST_EXTRA targets (none by default)
	@$(WITH_SERVICES)
	$(if $(strip $(TEST_EXTRA)),$(MAKE) $(TEST_EXTRA),echo "no TEST_EXTRA targets" >&2)

clean-services: ## stop the FerretDB started by `make services` (PostgreSQL is left alone)
	@scripts/services.sh stop

check-ops: ## systemd-analyze verify/security on systemd/, promtool on contrib/
	@scripts/check-units.sh
	scripts/check-contrib.sh

bench: ## services, then the release benchmarks (BENCH_SCALE=small for a quick run); writes target/bench/report.json
	@$(WITH_SERVICES)
	$(CARGO) bench --locked --bench outboxd

chaos: ## services, then the full fault campaign (CHAOS_PROFILE=quick for the short one); writes target/chaos/report.json
	@$(WITH_SERVICES)
	CHAOS_PROFILE="$${CHAOS_PROFILE:-full}" CHAOS_SEED="$${CHAOS_SEED:-$$(shuf -i 1-999999999 -n 1)}" $(CARGO) test --release --locked --test chaos -- --nocapture --test-threads=1

fuzz: ## services, then a long hostile-input campaign against ingest (HOSTILE_CASES=N)
	@$(WITH_SERVICES)
	HOSTILE_CASES="$${HOSTILE_CASES:-20000}" HOSTILE_SEED="$${HOSTILE_SEED:-$$(shuf -i 1-999999999 -n 1)}" $(CARGO) test --release --locked --test hostile_input -- --nocapture
