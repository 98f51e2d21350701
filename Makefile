# The two commands a new user runs: `make demo` and `make test`. Both create .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= data
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: demo test sweep venv install install-dev bench gpu-kit clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/attrlab demo --out $(DATA)

test: install
	$(BIN)/python -m pytest -q --durations=15

# A small ASHA sweep of stn_ranker on the embedded attrworld (6 trials of 300 steps, 2 at a time),
# then the best trial exported as a run directory (attrlab eval / index accept it). See README.
SWEEP_SETS := --set eval.every_steps=50 --set model.stage1_steps=100 --set scaling.cpus_per_worker=0.9 \
	--set data.loader.num_workers=0 --set model.tta_crops=1 --set schedule.log_every=25
sweep: install
	$(BIN)/attrlab shards build attrworld --out $(DATA)/shards/attrworld
	$(BIN)/attrlab tune stn_ranker --data $(DATA)/shards/attrworld --out $(DATA)/sweeps/stn_ranker \
		--trials 6 --max-steps 300 --workers-per-trial 1 --max-concurrent 2 $(SWEEP_SETS)
	test -d $(DATA)/runs/stn_ranker_tuned || $(BIN)/attrlab tune best $(DATA)/sweeps/stn_ranker \
		--export $(DATA)/runs/stn_ranker_tuned
	$(BIN)/attrlab eval $(DATA)/runs/stn_ranker_tuned

bench: install
	$(BIN)/attrlab bench all --work $(DATA)/bench --runs $(DATA)/runs

# The wheels a lent GPU machine lacks (DeepSpeed, faiss-cpu) for bench/gpu_device.sh; see BENCHMARKS.md
gpu-kit: install
	bash bench/gpu_kit.sh

clean:
	rm -rf $(DATA) .pytest_cache
