# Sparse is Enough, hands-on: set-up, tests and the book.
#   make book        execute every notebook at the default (laptop) size and build _build/html
#   make book FAST=1 the same at CI size
#   make test        unit tests, every notebook in fast mode (nbmake), the book with warnings as errors
#   make lab         JupyterLab on the notebooks
#   make clean       remove builds and the virtual environment

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Offline datasets: use ../shared/data when it exists, unless the caller set SPARSE_TUTORIAL_DATA.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)),)
SPARSE_TUTORIAL_DATA ?= $(SHARED_DATA)
export SPARSE_TUTORIAL_DATA
endif

ifeq ($(FAST),1)
export SPARSE_TUTORIAL_FAST := 1
endif

# Per-cell time limits (seconds): tiny CI runs, and the reader's full-size run.
FAST_CELL_TIMEOUT := 600
FULL_CELL_TIMEOUT := 3600

.PHONY: setup book test unit notebooks-fast html lab clean

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install --quiet -r requirements.txt 2>&1 | grep -v "^WARNING: Location"; test $${PIPESTATUS[0]} -eq 0
	$(BIN)/python -m pip install --quiet --no-deps -e . 2>&1 | grep -v "^WARNING: Location"; test $${PIPESTATUS[0]} -eq 0
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (sparse_tutorial)" >/dev/null
	@touch $@

setup: $(STAMP)

SHELL := /bin/bash

# Execute the notebooks with nbmake (writing their outputs), build the HTML from those outputs, then put
# the committed, output-free notebooks back whatever happened. $(1): per-cell timeout.
define execute_and_build
	@rm -rf _build/notebooks-src && mkdir -p _build && cp -a notebooks _build/notebooks-src
	@status=0; \
	$(BIN)/python -m pytest --nbmake --overwrite --nbmake-timeout=$(1) -p no:cacheprovider notebooks || status=$$?; \
	if [ $$status -eq 0 ]; then $(BIN)/jupyter-book build . -W --keep-going || status=$$?; fi; \
	rm -rf notebooks && cp -a _build/notebooks-src notebooks; \
	exit $$status
endef

unit: setup
	SPARSE_TUTORIAL_FAST=1 $(BIN)/python -m pytest -p no:cacheprovider tests

book: setup
	$(call execute_and_build,$(if $(SPARSE_TUTORIAL_FAST),$(FAST_CELL_TIMEOUT),$(FULL_CELL_TIMEOUT)))
	@echo "The book is at $(abspath _build/html/index.html)"

test: export SPARSE_TUTORIAL_FAST := 1
test: setup
	$(BIN)/python -m pytest -p no:cacheprovider tests
	$(call execute_and_build,$(FAST_CELL_TIMEOUT))
	@echo "make test: all passed; the fast-mode book is at $(abspath _build/html/index.html)"

lab: setup
	$(BIN)/jupyter lab notebooks

clean:
	rm -rf _build $(VENV) .pytest_cache .hypothesis
