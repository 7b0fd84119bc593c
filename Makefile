# The README's commands. Each runs the idempotent set-up first (scripts/setup.sh).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test soak bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The load tests alone, at full size (make test runs them smaller).
soak: setup
	SANDBOX_KERNELS_SOAK_VM_CYCLES=50 $(PY) -m pytest tests -m slow $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench

clean:
	.venv/bin/sandbox-kernels reap --yes 2>/dev/null || true
	rm -rf .venv build dist
