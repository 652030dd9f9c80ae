# grpc-etcd-proxy build / CI plumbing.
#
# Works from a fresh clone on a machine with Python 3.11+, make, Go and apt:
#   make venv    -> .venv with `-e .[dev]` (re-installed only when pyproject.toml changes)
#   make tools   -> .ci/install-tools.sh (apt packages + Go tools into .tools/bin)
#   make protos  -> protos/generate.sh with the venv's python
#   make lint    -> ruff check, ruff format --check, mypy on proxy/
#   make docs    -> the documentation site into site/ (mkdocs build --strict)
#   make docs-serve -> the same site on http://127.0.0.1:8000, rebuilt on every change
#   make compile -> the data path compiled with mypyc, in place (setup.py; rebuilt when changed)
#   make test    -> venv + tools + lint + docs + compile + pytest on the compiled build, then the
#                   codec, relay and conformance tests again on pure Python
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

.PHONY: venv tools protos lint docs docs-serve compile test test-pure run bench clean-venv clean-tools clean-compiled

venv: $(VENV_STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "'$(PYTHON) -m venv' failed (on Debian's own python3: apt-get install python3-venv)"; \
	  exit 1; }

# Installed as pure Python: `make compile` builds the compiled modules in place, so that an edit
# followed by `make test` rebuilds them (and pip does not compile on every install).
$(VENV_STAMP): pyproject.toml examples/pyproject.toml setup.py | $(VPY)
	$(VPY) -m pip install --upgrade pip
	GRPC_ETCD_PROXY_PURE=1 $(VPY) -m pip install -e '.[dev]' -e ./examples
	touch $@

# The modules setup.py compiles (its COMPILED list) and what they import at build time.
COMPILED_SRC := $(wildcard proxy/core/*.py proxy/core/*/*.py) \
	proxy/runtime/dispatcher.py proxy/runtime/downstream.py proxy/runtime/flusher.py \
	proxy/runtime/http1.py proxy/runtime/pool.py proxy/runtime/protocol.py \
	proxy/runtime/upstream.py
COMPILE_STAMP := build/.stamp-compiled

compile: $(COMPILE_STAMP)

# mypyc writes one shared library and a small module per source; touch them all so that the
# build's age (proxy/build_info.py's stale check) is the build's, not the last changed file's.
$(COMPILE_STAMP): $(COMPILED_SRC) setup.py | $(VENV_STAMP)
	$(VPY) setup.py --quiet build_ext --inplace
	find proxy -name '*.so' -exec touch {} +
	mkdir -p build && touch $@

clean-compiled:
	rm -rf build $(COMPILE_STAMP)
	find proxy -name '*.so' -delete

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
# The whole suite on the compiled build (tests/test_build.py checks that it is the one that
# runs), then the tests of the code that mypyc compiles again on pure Python.
PURE_TESTS := tests/core tests/h2 tests/relay tests/e2e tests/conformance tests/abuse tests/grpcweb \
	tests/test_build.py

test: venv tools lint docs compile
	EXPECT_BUILD=compiled $(VPY) -m pytest $(PYTEST_ARGS)
	GRPC_ETCD_PROXY_PURE=1 EXPECT_BUILD=pure $(VPY) -m pytest $(PURE_TESTS) $(PYTEST_ARGS)

test-pure: venv tools
	GRPC_ETCD_PROXY_PURE=1 EXPECT_BUILD=pure $(VPY) -m pytest $(PURE_TESTS) $(PYTEST_ARGS)

run: venv compile
	$(VENV)/bin/grpc-etcd-proxy demo

bench: venv tools compile
	$(VPY) -m loadtest.bench

clean-venv:
	rm -rf $(VENV)

clean-tools:
	rm -rf .tools
