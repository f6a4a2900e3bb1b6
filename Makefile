# Common commands. `make demo` and `make test` are the README's quick start.
PYTHON ?= python3
STAMP := .make

.PHONY: install demo test test-fast lint format bench clean

$(STAMP)/requirements: requirements.txt
	$(PYTHON) -m pip install -q -r requirements.txt
	@mkdir -p $(STAMP) && touch $@

install: $(STAMP)/requirements  ## Python packages (pinned)

demo: install  ## the main job end to end on the built-in corpus
	bash scripts/demo.sh

test: install  ## the whole test suite (SLURM/MPI tests need .ci/install_system_deps.sh, as root)
	$(PYTHON) -m pytest -q

test-fast: install  ## unit tests only, no multi-process jobs
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

bench: install  ## benchmarks (figures go into docs/benchmarks.md by hand)
	$(PYTHON) benchmarks/bench_data_prep.py
	$(PYTHON) benchmarks/bench_model.py
	$(PYTHON) benchmarks/bench_attention.py
	$(PYTHON) benchmarks/bench_train.py

clean:
	rm -rf $(STAMP) runs .pytest_cache .ruff_cache
