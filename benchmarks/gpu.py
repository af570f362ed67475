"""GPU throughput and memory: lightning-peft with bf16, with bf16 + FSDP (PeftFSDPStrategy, 1 GPU), with a 4-bit base
(QLoRA), and the HF ``Trainer`` + ``peft`` with bf16 and with QLoRA, on the same model, data, batch and number of
steps; then the same QLoRA comparison on the decoder (SmolLM2-135M-Instruct on Dolly, against TRL's ``SFTTrainer``).

    python benchmarks/gpu.py --json benchmarks/results/gpu.json          # needs a CUDA GPU

Setting: the packaged MiniLM-L6 encoder (or ``--model``), LoRA r=8 (alpha 16, dropout 0.1) on query/value, SST-2
training rows (the first ``--train-rows`` of a seeded shuffle), batch 32, max_length 128, ``--steps`` optimizer
steps (300), AdamW lr 5e-4, linear decay, gradients clipped at 1.0, bf16 autocast. Each run is a fresh process.
Tokens/s counts real (non-padding) tokens trained on per second of ``fit`` / ``train``; peak memory is
``torch.cuda.max_memory_allocated`` over the run. All runs draw shuffled batches; ours compute each as packed rows
(our default), the HF run pads each batch to its longest row (its default).

QLoRA runs (``*_qlora``) load the base with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16)`` (``configs/quantization/qlora_4bit.yaml``;
ours through ``backbone.quantization``, the baselines through ``from_pretrained`` + peft's
``prepare_model_for_kbit_training``). ``decoder_*`` runs train ``models/SmolLM2-135M-Instruct`` (``make install``)
on the first Dolly-15k training conversations (``--dolly-dir``), batch 8, max_length 512, lr 2e-4, LoRA r=8 on
q_proj/v_proj, for ``--steps`` steps: ``CausalGenerator`` + ``ChatDataModule`` (bf16 base, or 4-bit) vs TRL's
``SFTTrainer`` on the 4-bit base.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classification import add_sst2_arguments, lora_config, sst2_workers  # noqa: E402
from common import (  # noqa: E402
    QUIET,
    REPO,
    base_parser,
    hf_training_arguments,
    print_table,
    report,
    run_all,
    work,
    write_json,
)

RUNS = (
    "lightning_peft_bf16", "lightning_peft_fsdp_bf16", "hf_trainer_bf16", "lightning_peft_qlora", "hf_trainer_qlora",
    "decoder_lightning_peft_bf16", "decoder_lightning_peft_qlora", "decoder_trl_qlora",
)
DECODER = REPO / "models" / "SmolLM2-135M-Instruct"


def nf4_config() -> Any:
    """QLoRA's base: 4-bit NF4 with double quantisation, computing in bfloat16 (configs/quantization/qlora_4bit)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def quantised_base(model_class: type, path: str, **kwargs: Any) -> Any:
    """A baseline's 4-bit base, prepared for k-bit training as peft's QLoRA examples do."""
    from peft import prepare_model_for_kbit_training

    model = model_class.from_pretrained(path, quantization_config=nf4_config(), device_map={"": 0}, **kwargs)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def cuda_stats(seconds: float, tokens: int, rows: int) -> dict[str, Any]:
    import torch

    return {
        "train_seconds": seconds,
        "train_tokens_per_s": tokens / seconds,
        "train_samples_per_s": rows / seconds,
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
        "device": torch.cuda.get_device_name(),
    }


def trained_tokens(dataset: Any, steps: int, batch_size: int) -> tuple[int, int]:
    """Real tokens and rows in ``steps`` batches: the mean row length times the rows seen (all runs see as many)."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    rows = steps * batch_size
    return round(sum(lengths) / len(lengths) * rows), rows


def run_lightning_peft(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from functools import partial

    import lightning.pytorch as pl
    import torch

    from lightning_peft import BackboneConfig, ClassificationDataModule, SequenceClassifier, TrainingConfig
    from lightning_peft.strategies import PeftFSDPStrategy

    pl.seed_everything(args.seed, verbose=False)
    dm = ClassificationDataModule(tokenizer=args.model, train_file=args.train_file, text_column="sentence",
                                  max_length=args.max_length, batch_size=args.batch_size, seed=args.seed)
    quantization = nf4_config() if args.worker.endswith("_qlora") else None
    model = SequenceClassifier(BackboneConfig(pretrained_model_name_or_path=args.model, quantization=quantization),
                               lora_config(), labels=dm.labels, optimizer=partial(torch.optim.AdamW, weight_decay=0.01),
                               training=TrainingConfig(lr=args.lr))
    strategy = PeftFSDPStrategy() if args.worker == "lightning_peft_fsdp_bf16" else "auto"
    settings = {**QUIET, "accelerator": "gpu", "devices": 1}
    trainer = pl.Trainer(max_steps=args.steps, precision="bf16-mixed", strategy=strategy, gradient_clip_val=1.0,
                         limit_val_batches=0, enable_checkpointing=False, **settings)
    dm.setup("fit")
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    return cuda_stats(seconds, *trained_tokens(dm.datasets["train"], args.steps, args.batch_size))


def run_hf_trainer(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import csv

    import torch
    from datasets import load_dataset
    from peft import TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    raw = load_dataset("csv", data_files={"train": args.train_file}, delimiter="\t", quoting=csv.QUOTE_NONE)
    encoded = raw.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=args.max_length),
                      batched=True, remove_columns=["sentence"])
    if args.worker.endswith("_qlora"):
        model = quantised_base(AutoModelForSequenceClassification, args.model, num_labels=2)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    model = get_peft_model(model, lora_config(TaskType.SEQ_CLS))
    training_args = hf_training_arguments(args, workdir, grouped=False, bf16=True, use_cpu=False, max_steps=args.steps)
    trainer = Trainer(model=model, args=training_args, train_dataset=encoded["train"],
                      data_collator=DataCollatorWithPadding(tokenizer))
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return cuda_stats(seconds, *trained_tokens(encoded["train"], args.steps, args.batch_size))


def run_decoder(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """``decoder_*`` runs: SmolLM2 on Dolly chat, ours (bf16 or 4-bit base) or TRL's SFTTrainer (4-bit base)."""
    import lightning.pytorch as pl
    import torch
    from causal_lm import lora_config as decoder_lora
    from causal_lm import read_conversations

    train_file = args.dolly_dir / "train.jsonl"
    rows = args.steps * args.decoder_batch_size
    torch.cuda.reset_peak_memory_stats()
    if args.worker.startswith("decoder_lightning_peft"):
        from lightning_peft import BackboneConfig, CausalGenerator, ChatDataModule, TrainingConfig

        pl.seed_everything(args.seed, verbose=False)
        dm = ChatDataModule(tokenizer=str(DECODER), train_file=str(train_file), limit_train_samples=rows,
                            max_length=512, batch_size=args.decoder_batch_size)
        quantization = nf4_config() if args.worker.endswith("_qlora") else None
        model = CausalGenerator(BackboneConfig(str(DECODER), quantization=quantization), decoder_lora(),
                                val_generation_batches=0, training=TrainingConfig(lr=2e-4))
        trainer = pl.Trainer(max_steps=args.steps, precision="bf16-mixed", gradient_clip_val=1.0, limit_val_batches=0,
                             enable_checkpointing=False, **{**QUIET, "accelerator": "gpu", "devices": 1})
        dm.setup("fit")
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        seconds = time.perf_counter() - start
        return cuda_stats(seconds, *trained_tokens(dm.datasets["train"], args.steps, args.decoder_batch_size))
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(args.seed)
    conversations = read_conversations(train_file, rows)
    data = Dataset.from_dict({"prompt": [m[:-1] for m in conversations], "completion": [m[-1:] for m in conversations]})
    config = SFTConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=args.decoder_batch_size, max_steps=args.steps,
        learning_rate=2e-4, lr_scheduler_type="linear", seed=args.seed, max_length=512, bf16=True,
        save_strategy="no", eval_strategy="no", logging_steps=50, report_to="none", disable_tqdm=True,
    )
    trainer = SFTTrainer(model=quantised_base(AutoModelForCausalLM, str(DECODER)), args=config, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(DECODER), peft_config=decoder_lora())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return cuda_stats(seconds, *trained_tokens(trainer.train_dataset, args.steps, args.decoder_batch_size))


def main() -> None:
    parser = base_parser(__doc__, "sst2", RUNS, seeds=[42])
    add_sst2_arguments(parser)
    parser.set_defaults(train_rows=20000, max_length=128)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--dolly-dir", type=Path, default=REPO.parent / "shared" / "data" / "dolly15k")
    parser.add_argument("--decoder-batch-size", type=int, default=8)
    args = parser.parse_args()
    if args.worker and args.worker.startswith("decoder_"):
        with tempfile.TemporaryDirectory() as tmp:
            report(run_decoder(args, Path(tmp)))
        return
    if args.worker:
        work(args, run_lightning_peft, run_hf_trainer)
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False on this machine)")
    with sst2_workers(args) as (model, worker_args):
        extra = ["--steps", str(args.steps), "--dolly-dir", str(args.dolly_dir),
                 "--decoder-batch-size", str(args.decoder_batch_size)]
        per_seed = run_all(__file__, args.runs, args.seeds, [*worker_args, *extra])
    results = {name: records[0] for name, records in per_seed.items()}
    print_table(results, baselines=("hf_trainer_bf16", "hf_trainer_qlora", "decoder_trl_qlora"), columns=[
        ("tokens/s", 12, lambda r: f"{r['train_tokens_per_s']:.0f}"),
        ("peak GPU MB", 13, lambda r: f"{r['peak_gpu_memory_mb']:.0f}"),
    ])
    write_json(args.json, results, {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                                    "train_rows": args.train_rows, "model": model})


if __name__ == "__main__":
    main()
