# The project's entry points. Each provisions what it needs (idempotently, cached in .lab/).
#   make demo                the main job, on built-in defaults
#   make test                every test: unit and VM
#   make bench [BENCH=name]  benchmarks; results in target/bench/NAME.json
#   make lint                rustfmt and clippy, as CI runs them
#   make fuzz [FUZZ_CASES=n] the property fuzzers at n cases each (make test runs a few hundred)

CARGO ?= cargo
BENCH ?=
FUZZ_CASES ?= 100000
# The proptest targets: the app protocol, the backend's checks of app ranges, the control
# protocol, the keeper's vhost-user message parser.
FUZZ_TARGETS = -p balloon-protocol --test fuzz_app_protocol \
	-p vhost-balloon-backend --test fuzz_app_ranges --test fuzz_control \
	-p vhost-user-keeper --test fuzz_message

.PHONY: demo test bench fuzz lint provision provision-debian clean-lab

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

# The benchmarks that need no VM are cargo benches of their crate (scheduler/benches/); the
# others are balloon-bench's (tests/src/bin/bench/). BENCH names some of either (empty: all);
# every one named runs, and the target fails if any did.
SCHEDULER_BENCHES = scheduler_tick policy_scenarios
bench_scheduler = $(if $(BENCH),$(filter $(SCHEDULER_BENCHES),$(BENCH)),$(SCHEDULER_BENCHES))
bench_lab = $(filter-out $(SCHEDULER_BENCHES),$(BENCH))
bench: provision
	$(CARGO) build --release --workspace
	failed=0; \
	$(if $(bench_scheduler),$(CARGO) bench -q -p scheduler $(addprefix --bench ,$(bench_scheduler)) || failed=1;) \
	$(if $(or $(bench_lab),$(if $(BENCH),,all)),$(CARGO) run --release -q -p balloon-tests --bin balloon-bench -- $(bench_lab) || failed=1;) \
	exit $$failed

fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release $(FUZZ_TARGETS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean-lab:
	rm -rf .lab
