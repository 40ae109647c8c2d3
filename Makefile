# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test build venv bench gpu-wheels gpu-setup gpu-test gpu-bench gpu-bench-run clean realdata browser

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

# Real-image benchmark material in .cache/realdata/<domain>/ (git-ignored), what the tests need: the Twemoji and
# Openclipart parts (2,000-pair scan parts) and each domain's open_clip local-dir model (its image tower's weights
# ship in benchmarks/data/); builds only what is missing. Needs npm (emoji) and apt-get (Debian's openclipart-png,
# downloaded and unpacked into the cache, nothing installed). bench_quality.py builds the rest it uses.
realdata: build
	$(BIN)/python benchmarks/realdata.py --towers full

# CPU benchmarks of this machine; each prints a table and appends to benchmarks/results.csv.
bench: build realdata
	$(BIN)/python benchmarks/bench_store.py
	$(BIN)/python benchmarks/bench_consistency.py
	$(BIN)/python benchmarks/bench_seed_correlation.py
	$(BIN)/python benchmarks/bench_gmm.py
	$(BIN)/python benchmarks/bench_scan.py
	$(BIN)/python benchmarks/bench_quality.py --sizes 2000 10000 --out bench-data/quality/quality.csv

# On a GPU machine that has python3 (3.12) with torch, triton, numba, pybind11 and cmake but no package registry.
# Packages it lacks travel as manylinux wheels for its Python in .whl/ (git-ignored; `make gpu-wheels` fills it on
# a machine that reaches the registry; `make gpu-wheels ALL=1` for the whole suite's) and are installed into
# GPU_SITE first. gpu-setup, gpu-test and gpu-bench can run one at a time where a command's time is limited.
GPU_SITE ?= /tmp/cfbd-fast-site
GPU_ENV   = PYTHONPATH=$(GPU_SITE) PYTHONUNBUFFERED=1
GPU_PYTHON_VERSION ?= 3.12
# What the scan, the gpu tests and the benchmarks import beyond the machine's own packages: about 60 MB of wheels,
# under the 64 MiB that travels with a working tree. GPU_WHEELS_MORE adds what the rest of the test suite needs.
GPU_WHEELS = pyarrow ml_dtypes safetensors typer click shellingham rich markdown-it-py mdurl Pygments annotated-doc \
	pydantic pydantic_core annotated-types typing-inspection pytest iniconfig pluggy packaging setuptools wheel
GPU_WHEELS_MORE = scikit-learn scipy joblib threadpoolctl narwhals cloudpickle pillow matplotlib contourpy cycler \
	fonttools kiwisolver pyparsing python-dateutil six tzdata
gpu-wheels: $(VENV)/.deps
	mkdir -p .whl
	pins=$$(for p in $(GPU_WHEELS) $(if $(ALL),$(GPU_WHEELS_MORE)); do grep -i "^$$p==" requirements.txt \
		|| echo "$$p"; done); \
	$(BIN)/python -m pip download -q --only-binary=:all: --no-deps --python-version $(GPU_PYTHON_VERSION) \
		--implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux_2_28_x86_64 --platform any -d .whl $$pins

gpu-setup:
	if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile \
		--upgrade --target $(GPU_SITE) .whl/*.whl; fi
	$(GPU_ENV) python3 -m pip install --no-deps --no-build-isolation -e .

GPU_TESTS ?= tests/test_transfer.py tests/test_gmm_device.py tests/test_mapper_precision.py \
	tests/test_ops_consistency.py tests/test_ops_seed_correlation.py
gpu-test: gpu-setup
	$(GPU_ENV) python3 -m pytest -m gpu -q $(GPU_TESTS)

# Stage times, bytes/s against the measured copy bandwidth, Triton vs eager torch, cold vs warm (3M x 1024 fp16).
# gpu-bench-run runs the benchmarks alone, on a machine where gpu-setup has run.
gpu-bench: gpu-test gpu-bench-run
gpu-bench-run:
	$(GPU_ENV) python3 benchmarks/bench_gpu.py
	$(GPU_ENV) python3 benchmarks/bench_consistency.py --device cuda
	$(GPU_ENV) python3 benchmarks/bench_seed_correlation.py --device cuda

clean:
	rm -rf build *.egg-info cfbd_fast/_core*.so
