# Two commands do everything on a fresh Debian 12 machine (as root, or with sudo):
#   make demo   prepare -> train -> predict -> evaluate on real dev imagery, picture in build/demo/;
#               on the multi-host rig as root (SINGLE_HOST=1: a one-machine cluster on 127.0.0.1;
#               CLUSTER=yarn: YARN and HDFS daemons on the rig instead of Spark standalone and S3)
#   make test   every test tier (cluster side, contract, multi-host rig, Hadoop, SSH, QGIS plugin)
# Each calls `setup` first, which installs what the machine lacks and is a no-op afterwards.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
QGIS_VENV   := .venv-qgis
PYTHON      ?= $(shell command -v python3.11 || echo /usr/bin/python3.11)
DATA        ?= $(abspath ../shared/data/dev)
BUILD       := build
EPOCHS      ?= 10
WORKERS     ?= 2
PYTEST_ARGS ?= --durations=15

export RS_DEV_DATA := $(DATA)
export PYTHONDONTWRITEBYTECODE := 1
# Spark and Horovod talk over loopback only.
export SPARK_LOCAL_IP := 127.0.0.1

.PHONY: help setup setup-system setup-venvs hadoop-jars demo train-full test test-cluster test-multihost test-hadoop test-plugin lint bench \
        bench-prepare package install-plugin clean

help:
	@echo "make demo   - run the whole pipeline on real dev imagery (writes $(BUILD)/demo/)"
	@echo "make test   - run every test tier"
	@echo "make train-full - train on all dev data until early stopping; val and test IoU"
	@echo "make bench  - run the benchmarks (prints ratios against their baselines)"
	@echo "make lint   - ruff on both packages"
	@echo "Options: DATA=$(DATA) EPOCHS=$(EPOCHS) WORKERS=$(WORKERS)"

setup: setup-system setup-venvs hadoop-jars

setup-system:
	@bash scripts/setup-system.sh

setup-venvs:
	@bash scripts/setup-venv.sh $(VENV) $(PYTHON)
	@bash scripts/setup-qgis-venv.sh $(QGIS_VENV)

# Real Hadoop 3.3.4 daemons (HDFS, YARN) for the hadoop tier, from Maven Central.
hadoop-jars: setup-system
	@bash scripts/fetch-hadoop.sh

# The plugin's code (QGIS venv) drives a throwaway Spark + OpenSSH cluster on 127.0.0.1.
demo: setup
	@QT_QPA_PLATFORM=offscreen $(QGIS_VENV)/bin/python scripts/demo.py --data "$(DATA)" \
	    --out $(BUILD)/demo --epochs $(EPOCHS) --workers $(WORKERS) $(if $(SINGLE_HOST),--single-host) $(if $(CLUSTER),--cluster $(CLUSTER))

# Longer: all dev data until early stopping, then validation and test IoU (build/train-full/).
train-full: setup
	@$(VENV)/bin/python scripts/train_full.py --data "$(DATA)" --out $(BUILD)/train-full \
	    --workers $(WORKERS)

test: setup test-cluster test-multihost test-hadoop test-plugin

test-cluster:
	$(VENV)/bin/python -m pytest tests/cluster_side tests/contract $(PYTEST_ARGS)

# Separate hosts on 127.0.0.2-6, each in its own mount namespace (root), with SeaweedFS as S3.
test-multihost:
	$(VENV)/bin/python -m pytest tests/multihost $(PYTEST_ARGS)

# Real NameNode and DataNodes as separate processes on the rig's hosts (tests/hadoop_daemons.py).
test-hadoop:
	$(VENV)/bin/python -m pytest tests/hadoop $(PYTEST_ARGS)

test-plugin:
	QT_QPA_PLATFORM=offscreen $(QGIS_VENV)/bin/python -m pytest tests/rs_qgis_plugin $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check cluster_side rs_qgis_plugin tests benchmarks scripts

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(VENV)/bin/python $$b || exit 1; done

bench-prepare: setup
	$(VENV)/bin/python benchmarks/bench_prepare.py

# The installable plugin zip: the plugin folder with metadata.txt and resources/ inside it.
PLUGIN_ZIP := $(BUILD)/rs_qgis_plugin.zip
package:
	@rm -rf $(BUILD)/package && mkdir -p $(BUILD)/package
	@cp -r rs_qgis_plugin $(BUILD)/package/
	@cp metadata.txt $(BUILD)/package/rs_qgis_plugin/
	@cp -r resources $(BUILD)/package/rs_qgis_plugin/
	@find $(BUILD)/package -name __pycache__ -prune -exec rm -rf {} +
	@rm -f $(PLUGIN_ZIP) && cd $(BUILD)/package && python3 -m zipfile -c ../rs_qgis_plugin.zip rs_qgis_plugin
	@echo "plugin package: $(PLUGIN_ZIP)"

QGIS_PROFILE ?= $(HOME)/.local/share/QGIS/QGIS3/profiles/default
install-plugin: package
	@mkdir -p "$(QGIS_PROFILE)/python/plugins"
	@rm -rf "$(QGIS_PROFILE)/python/plugins/rs_qgis_plugin"
	@cd "$(QGIS_PROFILE)/python/plugins" && python3 -m zipfile -e "$(abspath $(PLUGIN_ZIP))" .
	@echo "installed into $(QGIS_PROFILE)/python/plugins/rs_qgis_plugin (enable it in Plugins > Manage)"

clean:
	rm -rf $(BUILD) .pytest_cache
