# The two set-up commands of a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo-server
PORT ?= 17010

.PHONY: venv run stop test lint bench config-example clean

$(BIN)/esb: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/esb

venv: $(BIN)/esb

# A demo server with embedded defaults (SQLite ODB, embedded Redis), started in the background.
run: venv
	@test -f $(DEMO)/server.conf || $(BIN)/esb quickstart $(DEMO) --port $(PORT)
	$(BIN)/esb start $(DEMO)
	@echo "try: curl -s -X POST http://127.0.0.1:$(PORT)/demo/hello -d '{\"name\": \"esb\"}'"

stop: venv
	$(BIN)/esb stop $(DEMO)

test: venv
	$(BIN)/ruff check esb tests bench services
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

lint: venv
	$(BIN)/ruff check esb tests bench services

# Every benchmark runs even when one misses a target; the status is 1 when any did.
bench: venv
	@status=0; \
	$(BIN)/python bench/run.py || status=1; \
	$(BIN)/python bench/scheduler_bench.py || status=1; \
	$(BIN)/python bench/sql_notification_bench.py || status=1; \
	$(BIN)/python bench/amqp_bench.py || status=1; \
	$(BIN)/python bench/redis_memory_bench.py || status=1; \
	exit $$status

config-example: venv
	$(BIN)/esb config-example > server.conf.example

clean:
	rm -rf $(VENV) *.egg-info
