# The README's two commands: `make run` and `make test`. Both set up what they need
# (a virtual environment with the package, g++ for its fused statistics kernel, Debian's
# Fashion-MNIST; for the tests also Debian's Chromium, which renders the HTML report)
# and are idempotent.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium
CXX_COMPILER := /usr/bin/g++
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
EPOCHS ?= 10

.PHONY: run test setup data lint

setup: $(INSTALLED)

$(INSTALLED): setup.cfg pyproject.toml optinsight/native/step_statistics.cc | $(CXX_COMPILER)
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m optinsight.native  # compile the fused kernel now, not in the first fit
	touch $@

data: $(FASHION_MNIST)

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist

$(CXX_COMPILER):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq g++

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

run: $(INSTALLED) $(FASHION_MNIST)
	$(PY) main.py --dataset fashion-mnist --epochs $(EPOCHS)

test: $(INSTALLED) $(FASHION_MNIST) $(CHROMIUM)
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: $(INSTALLED)
	$(PY) -m ruff check .
