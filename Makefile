# grpc-etcd-proxy build / CI plumbing.
#
# Works from a fresh clone on a machine with Python 3.11+, make, Go and apt:
#   make venv    -> .venv with `-e .[dev]` (re-installed only when pyproject.toml changes)
#   make tools   -> .ci/install-tools.sh (apt packages + Go tools into .tools/bin)
#   make protos  -> protos/generate.sh with the venv's python
#   make lint    -> ruff check, ruff format --check, mypy on proxy/
#   make docs    -> the documentation site into site/ (mkdocs build --strict)
#   make docs-serve -> the same site on http://127.0.0.1:8000, rebuilt on every change
#   make test    -> venv + tools + lint + docs + pytest
#   make run     -> the demo
#   make bench   -> the load-test benchmark

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Stamp of the last successful `pip install -e .[dev]`; remade when pyproject.toml changes.
VENV_STAMP := $(VENV)/.stamp-dev-installed
# Go-installed tools (h2spec, ghz, grpcurl, interop_client, interop_server) live here.
TOOLS_BIN := $(CURDIR)/.tools/bin
# Paths ruff looks at (mypy is restricted to proxy/, as configured in pyproject.toml).
RUFF_PATHS ?= .
PYTEST_ARGS ?=

# Every command run below sees the project's tools first.
export PATH := $(TOOLS_BIN):$(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv tools protos lint docs docs-serve test run bench clean-venv clean-tools

venv: $(VENV_STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "'$(PYTHON) -m venv' failed (on Debian's own python3: apt-get install python3-venv)"; \
	  exit 1; }

$(VENV_STAMP): pyproject.toml examples/pyproject.toml | $(VPY)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e '.[dev]' -e ./examples
	touch $@

tools:
	bash .ci/install-tools.sh

protos: venv
	PYTHON="$(CURDIR)/$(VPY)" bash protos/generate.sh

lint: venv
	$(VENV)/bin/ruff check $(RUFF_PATHS)
	$(VENV)/bin/ruff format --check $(RUFF_PATHS)
	$(VENV)/bin/mypy proxy/ examples/proxy_examples/

# --strict turns every warning into a failure: a broken link or anchor, a page left out of the
# nav. NO_MKDOCS_2_WARNING silences mkdocs-material's banner about its end of life, printed on
# every build (see docs/development.md).
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs

docs: venv
	$(MKDOCS) build --strict

docs-serve: venv
	$(MKDOCS) serve --dev-addr 127.0.0.1:8000

# Prerequisites are listed in order; lint and docs depend on venv so that `make -j`
# cannot run them before the venv exists.
test: venv tools lint docs
	$(VPY) -m pytest $(PYTEST_ARGS)

run: venv
	$(VENV)/bin/grpc-etcd-proxy demo

bench: venv tools
	$(VPY) -m loadtest.bench

clean-venv:
	rm -rf $(VENV)

clean-tools:
	rm -rf .tools
