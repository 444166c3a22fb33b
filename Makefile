# The two commands of the README:
#   make book   creates the environment if missing, re-executes every chapter, builds the HTML
#   make test   creates the environment if missing, runs the test suite (incl. a smoke build of the book)
# Variables: PROFILE=smoke|quick|paper  DEVICE=auto|cpu|cuda[:N]  PYTHON=python3.11

PYTHON  ?= python3.11
VENV    ?= .venv
PROFILE ?= quick
DEVICE  ?= auto
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.bnbook-installed
DEBIAN_PACKAGES := chromium dataset-fashion-mnist poppler-utils
GLASS_RDA := data/glass/Glass.rda
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: book test setup debian clean-book help lock pdf screenshots

help:
	@echo "make book   - run every chapter (PROFILE=$(PROFILE), DEVICE=$(DEVICE)) and build _build/html"
	@echo "make test   - run the test suite"
	@echo "make setup  - create $(VENV) from requirements.lock and install Debian packages"
	@echo "make pdf    - the whole book as one PDF (_build/pdf/bnbook.pdf), offered by the rebuilt site"
	@echo "make screenshots - every page at 400 px, light and dark, into _build/screenshots"

book: setup
	$(BIN)/bnbook run --profile $(PROFILE) --device $(DEVICE)
	$(BIN)/bnbook build

test: setup
	$(BIN)/python -m pytest

# The PDF edition: a single-page build printed by headless Chromium once MathJax has typeset every
# formula (checked with pdftotext), then the site is rebuilt so that its download menu offers it.
pdf: setup
	$(BIN)/bnbook run --profile $(PROFILE) --device $(DEVICE)
	$(BIN)/python -m bnbook.publish pdf
	$(BIN)/bnbook build

# Look at the built site as a phone and a dark-mode reader see it; lists layout problems.
screenshots: setup
	$(BIN)/python -m bnbook.pagecheck _build/html --out _build/screenshots

setup: $(STAMP) debian $(GLASS_RDA)

# The environment is rebuilt when the lock file or pyproject.toml changes.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

# Debian packages: Chromium (headless page checks, the PDF edition), the offline Fashion-MNIST dataset,
# poppler-utils (pdfinfo/pdftotext check the PDF).
debian:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# The UCI Glass data (chapter 9) is R data in the Debian package r-cran-mlbench. Installing that
# package would pull in R itself, so only its .deb (1 MB, verified by apt) is downloaded and the one
# file extracted; bnbook reads it with the Python package rdata.
$(GLASS_RDA):
	@echo "extracting Glass.rda from the Debian package r-cran-mlbench"
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cd "$$tmp" && \
	  { apt-get download r-cran-mlbench >/dev/null 2>&1 || \
	    { $(SUDO) apt-get update -qq && apt-get download r-cran-mlbench; }; } && \
	  dpkg-deb -x r-cran-mlbench_*.deb pkg && \
	  install -D -m 644 pkg/usr/lib/R/site-library/mlbench/data/Glass.rda "$(CURDIR)/$@"

clean-book:
	rm -rf _build book/chapters book/_records book/status.md

# Maintainers: after changing the environment by hand, rewrite the lock and environment.yml from it.
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^bnbook' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements.lock
	{ echo "# Conda environment with the same pins as requirements.lock (a test checks they agree)."; \
	  echo "# conda env create -f environment.yml && conda activate bnbook && pip install --no-deps -e ."; \
	  printf 'name: bnbook\nchannels:\n  - conda-forge\ndependencies:\n  - python=3.11\n  - pip\n  - pip:\n'; \
	  sed 's/^/      - /' requirements.lock; } > environment.yml
