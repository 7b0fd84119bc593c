# The README's commands. Each runs the idempotent set-up first (scripts/setup.sh).
PY := .venv/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup demo test soak bench clean k8s-up k8s-down

setup:
	bash scripts/setup.sh test

# The demo sets up only what it uses: the Docker and VM runtimes, their images, the panel.
demo:
	bash scripts/setup.sh demo
	$(PY) scripts/demo.py

# The unit layer first (no engines, seconds), then every suite against real engines.
test: setup
	$(PY) -m pytest tests/unit -q
	$(PY) -m pytest tests --ignore=tests/unit $(PYTEST_ARGS)

# The start/stop cycles at full size, 50 per runtime (make test runs them smaller).
soak: setup
	SANDBOX_KERNELS_SOAK_VM_CYCLES=50 SANDBOX_KERNELS_SOAK_SSH_CYCLES=50 \
	SANDBOX_KERNELS_SOAK_K8S_CYCLES=50 SANDBOX_KERNELS_SOAK_DOCKER_CYCLES=50 \
	$(PY) -m pytest tests -m slow -k cycles $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

# The one-node test cluster (tests start and stop it themselves; these are for poking at it).
k8s-up:
	bash tests/infra/k8s/up.sh

k8s-down:
	bash tests/infra/k8s/down.sh

clean:
	bash tests/infra/k8s/down.sh 2>/dev/null || true
	.venv/bin/sandbox-kernels reap --yes 2>/dev/null || true
	rm -rf .venv build dist
