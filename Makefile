# Sparse is Enough, hands-on: set-up, tests and the book.
#   make book        execute every notebook at the default (laptop) size and build _build/html
#   make book FAST=1 the same at CI size
#   make test        unit tests, every notebook in fast mode (nbmake), the book with warnings as errors,
#                    then the rendered book in a headless Chromium (every page, every slider)
#   make check-book  the browser test alone, on the book already in _build/html
#   make lab         JupyterLab on the notebooks
#   make vendor-js   refresh the self-hosted widget and MathJax JavaScript (book/_extra/vendor) from npm
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

# The browser test needs the built book: the unit step leaves it out, and runs it after the build.
BROWSER_TEST := tests/test_rendered_book.py
# Versions of the self-hosted JavaScript (book/_extra/vendor/SOURCES.txt says the same).
HTML_MANAGER_VERSION := 1.0.15
MATHJAX_VERSION      := 3.2.2
VENDOR := book/_extra/vendor

.PHONY: setup book test unit check-book chromium vendor-js lab clean

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

# Debian's Chromium for the browser test, installed when missing and we are root; otherwise the test
# skips and says how to install it. $$CHROMIUM may name another Chromium or Chrome binary.
chromium:
	@if [ -n "$$CHROMIUM" ] || command -v chromium || command -v chromium-browser \
	    || command -v google-chrome-stable || command -v google-chrome; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get; then \
	  echo "Installing Debian's chromium for the browser test" >&2; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium fonts-liberation; } >/dev/null || echo "Could not install chromium: the browser test will skip" >&2; \
	else \
	  echo "No Chromium and not root: the browser test will skip (install it: sudo apt-get install -y chromium)" >&2; \
	fi >/dev/null

unit: setup
	SPARSE_TUTORIAL_FAST=1 $(BIN)/python -m pytest -p no:cacheprovider tests --ignore=$(BROWSER_TEST)

check-book: setup chromium
	$(BIN)/python -m pytest -p no:cacheprovider $(BROWSER_TEST)
	@echo "Screenshots of every page are in $(abspath _build/screenshots)"

book: setup
	$(call execute_and_build,$(if $(SPARSE_TUTORIAL_FAST),$(FAST_CELL_TIMEOUT),$(FULL_CELL_TIMEOUT)))
	@echo "The book is at $(abspath _build/html/index.html)"

test: export SPARSE_TUTORIAL_FAST := 1
# A fresh checkpoint folder per build, so CI trains what the notebooks train (chapter 4 reuses chapter 3's).
test: export SPARSE_TUTORIAL_CACHE := $(CURDIR)/_build/cache
test: setup chromium
	$(BIN)/python -m pytest -p no:cacheprovider tests --ignore=$(BROWSER_TEST)
	rm -rf _build/cache
	$(call execute_and_build,$(FAST_CELL_TIMEOUT))
	@set -o pipefail; $(BIN)/python -m pytest -p no:cacheprovider -rs $(BROWSER_TEST) | tee _build/browser-test.log
	@if grep -q "^SKIPPED" _build/browser-test.log; then \
	  echo "make test: passed, BUT THE BROWSER TEST SKIPPED (reason above): the rendered pages were NOT checked"; \
	else echo "make test: all passed; the fast-mode book is at $(abspath _build/html/index.html)"; fi

# Fetch the pinned packages from the npm registry and copy the few files the book serves.
vendor-js:
	@command -v npm >/dev/null || { echo "make vendor-js needs npm"; exit 1; }
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	(cd $$tmp && npm pack --silent @jupyter-widgets/html-manager@$(HTML_MANAGER_VERSION) mathjax@$(MATHJAX_VERSION) >/dev/null \
	  && mkdir hm mj && tar -xzf jupyter-widgets-html-manager-*.tgz -C hm && tar -xzf mathjax-*.tgz -C mj); \
	rm -rf $(VENDOR)/jupyter-widgets $(VENDOR)/mathjax; \
	mkdir -p $(VENDOR)/jupyter-widgets $(VENDOR)/mathjax/output/chtml/fonts; \
	cp $$tmp/hm/package/dist/embed.js $$tmp/hm/package/dist/embed.js.LICENSE.txt $$tmp/hm/package/dist/*.woff2 \
	  $(VENDOR)/jupyter-widgets/; \
	cp $$tmp/mj/package/es5/tex-chtml.js $$tmp/mj/package/LICENSE $(VENDOR)/mathjax/; \
	cp -r $$tmp/mj/package/es5/output/chtml/fonts/woff-v2 $(VENDOR)/mathjax/output/chtml/fonts/; \
	echo "Vendored html-manager $(HTML_MANAGER_VERSION) and MathJax $(MATHJAX_VERSION) into $(VENDOR)"

lab: setup
	$(BIN)/jupyter lab notebooks

clean:
	rm -rf _build $(VENV) .pytest_cache .hypothesis
