# mailroom: build, test and run against a local control plane.
# The two commands a newcomer needs: `make demo` and `make test`.

SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build test bench chaos soak fuzz lint fmt fmt-check clippy unit integration crds crds-check prometheus-rule testenv testenv-down pyenv demo demo-down clean-testenv image cluster cluster-down e2e demo-local krew

all: build

## build: compile the operator, the emulator and the tests (debug)
build:
	@echo "==> building mailroom and the Microsoft 365 emulator"
	$(CARGO) build --workspace --all-targets

## test: format check, clippy, unit tests, and integration tests against a real API server
test:
	@bash hack/test.sh

## chaos: the full chaos run (1,000 messages, operator kills, an API server restart, injected faults)
chaos:
	@bash hack/chaos.sh

## soak: the release operator for SOAK_MINUTES (default 30) at a steady rate with TTL cleanup; RSS, task, thread and fd slopes per hour
soak:
	@SOAK_MINUTES="$(SOAK_MINUTES)" SOAK_RATE="$(SOAK_RATE)" bash hack/soak.sh $(ARGS)

## bench: the release operator with N EmailMessages (default 2000; N=10000, BENCH_SIZES=1000,10000), the open-loop latency run and 100,000 finished messages (BENCH_HISTORY)
bench:
	@N="$(N)" BENCH_SIZES="$(BENCH_SIZES)" BENCH_HISTORY="$(BENCH_HISTORY)" bash hack/bench.sh $(ARGS)

## lint: rustfmt check and clippy with warnings as errors
lint: fmt-check clippy

fmt:
	$(CARGO) fmt --all

fmt-check:
	@echo "==> cargo fmt --check"
	$(CARGO) fmt --all -- --check

clippy:
	@echo "==> cargo clippy -D warnings"
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## unit: unit tests only (no cluster needed)
unit:
	$(CARGO) test --workspace --lib --bins

## fuzz: run each fuzz target in fuzz/ for FUZZ_SECONDS (default 60); installs cargo-fuzz when missing
fuzz:
	@bash hack/fuzz.sh

## crds: regenerate crds/ from the Rust types
crds:
	@mkdir -p crds
	$(CARGO) run --quiet -- crd > crds/mailroom.dev.yaml
	cp crds/mailroom.dev.yaml deploy/base/crds/mailroom.dev.yaml
	cp crds/mailroom.dev.yaml deploy/helm/mailroom/files/crds/mailroom.dev.yaml
	@echo "==> wrote crds/mailroom.dev.yaml"

## prometheus-rule: write the PrometheusRule copies of deploy/prometheus/mailroom-rules.yaml (the kustomize component's, the chart's)
prometheus-rule:
	@bash hack/prometheus-rule.sh

## krew: the kubectl plugin's archive for this host's platform (release build) and its krew manifest, in target/krew
krew:
	$(CARGO) build --release --bin mailroom
	@os="$$(uname -s | tr '[:upper:]' '[:lower:]')"; \
	arch="$$(uname -m | sed -e 's/^x86_64$$/amd64/' -e 's/^aarch64$$/arm64/')"; \
	archive="$$(bash hack/krew-manifest.sh archive target/release/mailroom "$$os" "$$arch")" && \
	bash hack/krew-manifest.sh manifest "$$archive" > target/krew/mailroom.yaml && \
	echo "==> $$archive and target/krew/mailroom.yaml (kubectl krew install --manifest=target/krew/mailroom.yaml --archive=$$archive)"

## image: the operator image as an OCI archive, target/image/mailroom-<version>.oci.tar, without a container engine (umoci; as root)
image:
	@bash hack/image.sh build

## cluster: a real one-node Kubernetes cluster on this host (root; builds its pieces once, cached in ~/.cache/mailroom)
cluster:
	@bash hack/cluster.sh up
	@echo "==> run: eval \"\$$(bash hack/cluster.sh env)\"   to use it with kubectl"

## cluster-down: stop the cluster and restore what it changed on the host (idempotent)
cluster-down:
	@bash hack/cluster.sh down

## e2e: the operator's release image installed by its Helm chart into the one-node cluster, full form
e2e:
	@bash hack/e2e.sh full

## testenv: start etcd and kube-apiserver on loopback (builds them once, cached in ~/.cache/mailroom)
testenv:
	@bash hack/testenv.sh up
	@echo "==> run: eval \"\$$(bash hack/testenv.sh env)\"   to use it with kubectl"

## testenv-down: stop the local control plane and remove its state
testenv-down:
	@bash hack/testenv.sh down

## pyenv: the Python virtual environment with the SMTP test server
pyenv:
	@bash hack/pyenv.sh >/dev/null

## demo: everything running locally, with messages delivered
demo:
	@bash hack/demo.sh up

## demo-local: the demo with the operator as a process beside a bare kube-apiserver (any host)
demo-local:
	@MAILROOM_DEMO_LOCAL=1 bash hack/demo.sh up

## demo-down: stop what `make demo` started
demo-down:
	@bash hack/demo.sh down
