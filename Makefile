# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test build venv bench gpu-bench clean realdata browser

demo: build
	$(BIN)/cfbd-fast demo

# The tests include detection quality on real images, so they need the benchmark material (built once, cached),
# and render the HTML report in a headless browser.
test: build realdata browser
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

# Headless Chromium for the report's rendering test (Debian's package; needs root or sudo).
browser:
	test -x /usr/bin/chromium || { apt-get update -q && apt-get install -y -q chromium; } || \
		{ echo "install Debian's chromium package (apt-get install chromium) as root" >&2; exit 1; }

venv: $(VENV)/.deps
$(VENV)/.deps: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps setup.py CMakeLists.txt $(wildcard csrc/*)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Real-image benchmark material in .cache/realdata/ (git-ignored): captioned emoji parts and a trained
# open_clip local-dir model; builds only what is missing. Needs npm for the emoji package.
realdata: build
	$(BIN)/python benchmarks/realdata.py

# CPU benchmarks of this machine; each prints a table and appends to benchmarks/results.csv.
bench: build realdata
	$(BIN)/python benchmarks/bench_store.py
	$(BIN)/python benchmarks/bench_consistency.py
	$(BIN)/python benchmarks/bench_seed_correlation.py
	$(BIN)/python benchmarks/bench_gmm.py
	$(BIN)/python benchmarks/bench_scan.py
	$(BIN)/python benchmarks/bench_quality.py --csv bench-data/quality/quality.csv

# On a GPU machine that has python3 with torch, triton, numba, pybind11 and cmake but no package registry.
# Packages it lacks (pyarrow, ml_dtypes, safetensors, typer, rich, scikit-learn, pytest, ...) travel as
# manylinux wheels for its Python in .whl/ (git-ignored) and are installed into GPU_SITE first.
GPU_SITE ?= /tmp/cfbd-fast-site
GPU_ENV   = PYTHONPATH=$(GPU_SITE) PYTHONUNBUFFERED=1
gpu-bench:
	if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile \
		--upgrade --target $(GPU_SITE) .whl/*.whl; fi
	$(GPU_ENV) python3 -m pip install --no-deps --no-build-isolation -e .
	$(GPU_ENV) python3 -m pytest -m gpu -q
	$(GPU_ENV) python3 benchmarks/bench_consistency.py --device cuda
	$(GPU_ENV) python3 benchmarks/bench_seed_correlation.py --device cuda
	$(GPU_ENV) python3 benchmarks/bench_scan.py --device cuda --dim 1024 --rows 3000000 --no-naive

clean:
	rm -rf build *.egg-info cfbd_fast/_core*.so
