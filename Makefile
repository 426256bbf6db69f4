# `make demo` and `make test` are the README's two commands; both install first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

CHROMIUM ?= /usr/bin/chromium

.PHONY: install demo test lint clean gpu-wheels

install: $(STAMP)

# torch first, pinned to the CPU build this project's machines install offline (constraints.txt);
# on a GPU machine install a CUDA build of torch into the venv before `make install` (README, "GPU").
$(STAMP): pyproject.toml containers/model/pyproject.toml containers/ui/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt \
		-e "containers/model[gcs]" -e containers/ui -e ".[dev]"
	touch $(STAMP)

# The local target: no cloud account, no Docker, no network. The tiny model draws noise by design.
demo: install
	$(VENV)/bin/sdxlctl deploy
	$(VENV)/bin/sdxlctl predict "a red fox in the snow, golden hour" --seed 42 -o out.png
	@echo
	@echo "The image is in $(CURDIR)/out.png. The model server keeps running:"
	@echo "  $(VENV)/bin/sdxlctl status             what runs, where, since when"
	@echo "  $(VENV)/bin/sdxlctl predict \"...\" -o x.png   another image"
	@echo "  $(VENV)/bin/sdxlctl teardown --yes     stop it"

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy

# Browser tests drive Debian's Chromium (Playwright never downloads a browser of its own).
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "the browser tests need Chromium at $(CHROMIUM): sudo apt-get install chromium (or set CHROMIUM=...)"; \
		exit 1; \
	fi

# Two workers: most tests wait on a server process or a subprocess, so two keep both cores busy (on the 2-core
# CI machine the suite takes about half as long). worksteal: the few multi-minute compile tests don't leave
# one worker idle at the end. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: lint $(CHROMIUM)
	CHROMIUM=$(CHROMIUM) $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .sdxlctl

# What bench/gpu-run.sh installs on a borrowed GPU machine (Python 3.12, torch already there, no network):
# the model server's pure-Python dependencies, at this project's pins, and pydantic-core built for 3.12.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d .whl -c constraints.txt \
		diffusers peft starlette uvicorn pydantic annotated-types typing-inspection importlib-metadata lazy-importer
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d .whl -c constraints.txt \
		--python-version 3.12 --platform manylinux2014_x86_64 pydantic-core
