# Everything a fresh machine needs is installed from here: `make test` on a clean clone is the real check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 4000
DEMO_TLS_PORT ?= 4443
DEMO_DB ?= demo.db

.PHONY: install js-install sdk-install debian-packages demo run run-tls test test-prerequisites typecheck lint bench clean wheel deploy-check

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

# The JavaScript clients the tests drive (the AWS SDK v3 with its default HTTP/2 handler,
# LangChain.js), exactly as locked.
JS_STAMP := tests/js/node_modules/.installed-stamp
$(JS_STAMP): tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	touch $@

js-install: $(JS_STAMP)

# The Python SDK for Bedrock (aws-sdk-bedrock-runtime, CRT transport) needs Python >= 3.12:
# its own venv when one is installed (pyenv's, or on PATH); its test skips without one.
PY312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.1[2-9]*/bin/python3) \
	$(shell for p in python3.13 python3.12; do $$p -c 'import sys; assert sys.version_info >= (3, 12)' \
	2>/dev/null && command -v $$p && break; done))
SDK_VENV := tests/py312/.venv
SDK_STAMP := $(SDK_VENV)/.installed-stamp
$(SDK_STAMP): tests/py312/requirements.txt
	@if [ -n "$(PY312)" ]; then \
		$(PY312) -m venv $(SDK_VENV) && $(SDK_VENV)/bin/pip install -q -r tests/py312/requirements.txt \
		&& touch $@; \
	else echo "no Python >= 3.12: the Python SDK's test will be skipped"; fi

sdk-install: $(SDK_STAMP)

# Without BEDROCK_PROXY_MASTER_KEY the proxy only runs unauthenticated, so it is bound to loopback.
run: install
	@if [ -n "$$BEDROCK_PROXY_MASTER_KEY" ]; then \
		exec $(VENV)/bin/bedrock-proxy serve --port $(PORT); \
	else \
		echo "BEDROCK_PROXY_MASTER_KEY is not set: serving unauthenticated on $(HOST):$(PORT) only"; \
		exec $(VENV)/bin/bedrock-proxy serve --host $(HOST) --port $(PORT) --allow-unauthenticated; \
	fi

# The proxy on its built-in simulator (no AWS), with demo keys and a little traffic:
# open http://127.0.0.1:4000/ui and sign in with the key it prints.
demo: install
	exec $(VENV)/bin/bedrock-proxy demo --port $(PORT) --tls-port $(DEMO_TLS_PORT) --sqlite-path $(DEMO_DB)

# HTTPS on :4000 with a self-signed certificate for localhost (kept in .tls/).
run-tls: install
	@[ -f .tls/cert.pem ] || $(VENV)/bin/bedrock-proxy tls-selfsigned --out .tls
	@if [ -n "$$BEDROCK_PROXY_MASTER_KEY" ]; then \
		exec $(VENV)/bin/bedrock-proxy serve --port $(PORT) --tls-cert .tls/cert.pem --tls-key .tls/key.pem; \
	else \
		echo "BEDROCK_PROXY_MASTER_KEY is not set: serving unauthenticated on $(HOST):$(PORT) only"; \
		exec $(VENV)/bin/bedrock-proxy serve --host $(HOST) --port $(PORT) --allow-unauthenticated \
			--tls-cert .tls/cert.pem --tls-key .tls/key.pem; \
	fi

# Debian packages the tests use, in one apt-get run: Chromium and its driver for the
# console's browser tests (nothing is fetched at test time: Selenium is pointed at these
# two), and docker-compose, as root only, for deploy-check. A second make test beside this
# one waits for the first's apt (flock), and any other apt for dpkg's lock.
debian-packages:
	@missing=""; \
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || missing="chromium chromium-driver"; \
	if [ "$$(id -u)" = 0 ] && ! docker compose version >/dev/null 2>&1 \
		&& ! command -v docker-compose >/dev/null; then missing="$$missing docker-compose"; fi; \
	if [ -n "$$missing" ]; then \
		echo "apt-get install $$missing"; \
		flock -w 900 /tmp/bedrock-proxy-apt.lock sh -c \
			"apt-get -o DPkg::Lock::Timeout=600 update -qq && \
			 apt-get -o DPkg::Lock::Timeout=600 install -y -qq $$missing >/dev/null"; \
	fi

# The set-up steps are independent (pip, npm, a second venv, apt), so they run side by side:
# a fresh clone's `make test` spends a minute less before its first test. Then three workers
# on the two cores, a test file each at a time (module fixtures stay in one process): the
# tests wait on servers as much as they compute (2:26-2:30 with two workers here, 1:57-2:14
# with three).
# Every server a test starts listens on its own port, PostgreSQL gives each test file its
# own database, and files go out longest first (tests/conftest.py: LONGEST_FIRST).
test:
	@$(MAKE) --no-print-directory -j4 --output-sync=target test-prerequisites
	$(VENV)/bin/ruff check proxy tests
	$(PY) tests/check_sizes.py
	$(PY) -m pytest -n 3 --dist loadfile --no-loadscope-reorder

test-prerequisites: install js-install sdk-install debian-packages deploy-check typecheck

# Types (strict on wire/, store/, access/ and metering/) and the layer contract.
typecheck: install
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The wheel deploy/Dockerfile installs (it builds the same one in its first stage).
wheel: install
	$(PY) -m pip wheel -q --no-deps -w dist .

# Kubernetes manifests against their schemas, the compose file, the wheel's contents.
deploy-check: install debian-packages
	VENV=$(VENV) deploy/check.sh

# A benchmark, not a test: one table, and bench-results.json to compare commits.
bench: install
	@command -v wrk >/dev/null && command -v h2load >/dev/null && command -v valgrind >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq wrk nginx-light nghttp2-client valgrind)
	$(PY) tests/benchmark.py --out bench-results.json

lint: install
	$(VENV)/bin/ruff check proxy tests
	$(VENV)/bin/ruff format --check proxy tests
	$(PY) tests/check_sizes.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
