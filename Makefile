# The README's two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Reinstall only when the dependency files change.
DEPS_HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(DEPS_HASH)

.PHONY: run test lint install clean token api-key worker-wheel

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m swarm_portal.launcher

# An API token for the admin account of the embedded default (printed once, stored hashed).
token: $(STAMP)
	@$(BIN)/python -m swarm_portal.launcher manage create_api_token admin

# An API key for inference under /v2, valid for every deployment (printed once).
api-key: $(STAMP)
	@$(BIN)/python -m swarm_portal.launcher manage create_api_key --name make-api-key

# The GPU server's install (README, "Add a GPU server"): swarm-worker's wheel in dist/, to copy
# there. setuptools' build/ is cleared first: it would ship modules deleted since. The egg-info
# lands in worker/.., where its packages are (package-dir "..").
WORKER_BUILD_FILES := worker/build worker/../swarm_worker.egg-info
worker-wheel: $(STAMP)
	@rm -rf $(WORKER_BUILD_FILES) dist/swarm_worker-*.whl
	$(BIN)/python -m pip wheel --quiet --no-deps -w dist ./worker
	@rm -rf $(WORKER_BUILD_FILES)
	@ls dist/swarm_worker-*.whl

# Two workers; the real-process (slow) tests run one at a time on one of them
# (tests/parallel.py). PYTEST_WORKERS=0 runs everything in this process.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -p tests.parallel -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/mypy --python-version 3.10 swarm_protocol serving/agent serving/replica
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/python manage.py check

clean:
	rm -rf var .pytest_cache .ruff_cache
