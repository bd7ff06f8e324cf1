# The two commands a new user types: `make demo` and `make test`.
# Both create .venv inside the checkout and install what they need.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test setup bench-head gpu-check clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh

setup: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

bench-head: $(STAMP)
	$(PY) -m bench.head

# On a CUDA machine (no venv needed; uses the installed torch): make gpu-check OUT=gpu_out [WHEELS=dir]
gpu-check:
	bash scripts/gpu_check.sh $(or $(OUT),gpu_out) $(WHEELS)

clean:
	rm -rf .venv demo_out .pytest_cache
