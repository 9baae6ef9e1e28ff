# Quick start: `make demo` and `make test` on a fresh machine (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cryowae-installed
EXTRAS ?= dev,cluster,napari
DEMO_DIR ?= demo_out
# pytest-xdist workers for make test / test-fast: one per core (each worker then runs
# torch single-threaded on a 2-core machine; see tests/conftest.py); --dist worksteal:
# a worker that runs out of tests takes half of the other's queue, so the long tests
# (put first by tests/conftest.py) do not leave one worker idle at the end
TEST_WORKERS ?= auto
# idle OpenMP threads sleep instead of spinning: small torch ops were 10-20x slower
# with spinning threads on a busy 2-core machine
export OMP_WAIT_POLICY ?= PASSIVE
# bytecode caches written even where the environment says not to: without them every
# test worker and every `python -m cryowae` a test runs compiles cryowae again and
# pytest rewrites the tests again (make test-fast: 64 s, 45 s once the caches exist)
unexport PYTHONDONTWRITEBYTECODE
# system packages the tests need: a virtual X server and Mesa software OpenGL (napari),
# a one-node SLURM with munge (restore-batch --cluster slurm test)
SYSTEM_PACKAGES := xvfb xauth libgl1-mesa-dri libegl1 libglib2.0-0 libfontconfig1 \
	libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
	libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xfixes0 libxcb-cursor0 \
	libdbus-1-3 slurm-wlm munge

.PHONY: install system-packages demo test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# the CPU wheel of torch lies on disk here; without this pip pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

demo: $(STAMP)
	$(PY) -m cryowae.demo --out $(DEMO_DIR)

# the whole suite (CI runs this)
test: $(STAMP) system-packages
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# the inner loop: the same set-up, without the tests marked slow
test-fast: $(STAMP) system-packages
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check cryowae cli plugins tests benchmarks

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
