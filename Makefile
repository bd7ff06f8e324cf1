# The two commands a new user types: `make demo` and `make test`.
# Both create .venv inside the checkout and install what they need.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test setup bench-head gpu-check device-dryrun clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh

setup: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

# lint + import order (ruff) and the type check (pyright), config in pyproject.toml, zero
# findings each; then the suite. PYRIGHT_PYTHON_IGNORE_WARNINGS: no "newer version" look-up.
test: $(STAMP)
	$(PY) -m ruff check .
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 .venv/bin/pyright
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

bench-head: $(STAMP)
	$(PY) -m bench.head

# On a CUDA machine (no venv, no make needed: bash scripts/device_check.sh OUT; docs/performance.md)
gpu-check:
	bash scripts/device_check.sh $(or $(OUT),gpu_out)

# The device check on CPU at tiny sizes, in a venv shaped like the device's software (CI runs it)
device-dryrun:
	bash scripts/device_dryrun.sh $(or $(OUT),device_dryrun_out)

clean:
	rm -rf .venv .venv-device demo_out device_dryrun_out .pytest_cache
