# The project's entry points. Each provisions what it needs (idempotently, cached in .lab/).
#   make demo                the main job, on built-in defaults
#   make test                every test: unit and VM
#   make bench [BENCH=name]  benchmarks; results in target/bench/NAME.json
#   make lint                rustfmt and clippy, as CI runs them

CARGO ?= cargo
BENCH ?=

.PHONY: demo test bench lint provision provision-debian clean-lab

provision:
	scripts/lab.sh all

# The Debian image with systemd is built on demand by the tests that need it; this builds it now.
provision-debian: provision
	scripts/lab.sh debian

demo: provision
	$(CARGO) build --release --workspace
	$(CARGO) run --release -q -p balloon-tests --bin balloon-demo

test: provision
	$(CARGO) build --workspace
	$(CARGO) test --workspace

bench: provision
	$(CARGO) build --release --workspace
	$(CARGO) run --release -q -p balloon-tests --bin balloon-bench -- $(BENCH)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean-lab:
	rm -rf .lab
