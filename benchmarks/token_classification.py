"""CoNLL-2003 NER benchmark: lightning-peft vs the HF ``Trainer`` + ``peft`` token-classification recipe.

    python benchmarks/token_classification.py --json benchmarks/results/token_classification.json
    python benchmarks/token_classification.py --setting low_resource --seeds 42 43 44 --json out.json

Setting: the packaged MiniLM-L6 encoder with LoRA r=8 (alpha 16, dropout 0.1) on query/value plus the trained
classification head, 2 epochs, batch 32, max_length 128, AdamW lr 5e-4 (``--lr default``: lightning-peft's default
for LoRA, 2e-3; weight decay 0.01), linear decay,
gradient norm clipped at 1.0 (the HF Trainer's default), seed 42; entity F1 on the full test split. Training
sentences: ``standard``, the first 4,000; ``low_resource``, 3,400 drawn so that only 25 % of them hold an entity
(rare entities, few sentences: where a held-out set showed our gap). Each run is a fresh subprocess.

Runs: ``lightning_peft_yaml`` (what a user gets from a YAML with the model, the data and the budget only, every
other setting the CLI's default: ``lightning-peft fit``, then ``test --ckpt_path best``, validating on valid.txt;
``--cli-args`` adds CLI arguments to measure a single default), ``lightning_peft`` (our defaults from Python:
shuffled batches, each computed as packed rows, the final weights tested),
``lightning_peft_shuffled`` (HF's batching computed as HF does: each shuffled, padded batch in one piece, so the
difference is framework overhead only), ``hf_trainer`` (the transformers example recipe: first sub-token
labelling, seqeval on those positions), ``hf_trainer_grouped`` (``train_sampling_strategy="group_by_length"``)
and ``lightning_peft_grouped`` (window-2 length grouping, packed rows).
Train samples/s = sentences × epochs / wall time of ``fit`` / ``train`` (tokenisation before, no evaluation
inside). Our F1 counts every word (words cut by max_length as ``O``); the HF recipe drops them, which can only
raise its number.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    QUIET,
    base_parser,
    default_model,
    hf_training_arguments,
    print_table,
    run_all,
    summarise,
    timed_fit,
    training_worker_args,
    work,
    write_json,
)

RUNS = ("lightning_peft", "lightning_peft_yaml", "lightning_peft_shuffled", "hf_trainer", "hf_trainer_grouped",
        "lightning_peft_grouped")
#: our runs → (group_by_length, micro_batch_size, sequence_packing)
OURS = {
    "lightning_peft": (False, 16, True),
    "lightning_peft_shuffled": (False, None, False),
    "lightning_peft_grouped": (True, 16, True),
}
HF_GROUPED = {"hf_trainer": False, "hf_trainer_grouped": True}
#: setting → (training sentences, share of them holding an entity; None: the first sentences as they come)
SETTINGS = {"standard": (4000, None), "low_resource": (3400, 0.25)}


def lora_config(task_type: Any = None) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"], task_type=task_type)


def run_lightning_peft(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from functools import partial

    import lightning.pytorch as pl
    import torch

    from lightning_peft import BackboneConfig, TokenClassificationDataModule, TokenClassifier, TrainingConfig

    grouped, micro_batch_size, packing = OURS[args.worker]
    pl.seed_everything(args.seed, verbose=False)
    dm = TokenClassificationDataModule(
        tokenizer=args.model, train_file=args.train_file, test_file=str(args.data_dir / "test.txt"),
        max_length=args.max_length, batch_size=args.batch_size, group_by_length=grouped, seed=args.seed,
    )
    model = TokenClassifier(
        BackboneConfig(pretrained_model_name_or_path=args.model), lora_config(), labels=dm.labels,
        optimizer=partial(torch.optim.AdamW, weight_decay=0.01),
        training=TrainingConfig(lr=resolved_lr(args), micro_batch_size=micro_batch_size, sequence_packing=packing),
    )
    seconds = timed_fit(model, dm, args.epochs)
    metrics = pl.Trainer(**QUIET).test(model, datamodule=dm, verbose=False)[0]
    return {
        "train_seconds": seconds,
        "train_samples_per_s": len(dm.datasets["train"]) * args.epochs / seconds,
        "test_f1": metrics["test/f1"],
    }


def run_lightning_peft_yaml(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """What a user gets from a YAML with the model, the data and the budget only (every other setting the CLI's
    default), through ``lightning-peft fit`` and ``lightning-peft test --ckpt_path best``."""
    import yaml

    from lightning_peft.cli import LightningPeftCLI

    config = {
        "seed_everything": args.seed,
        "trainer": {"max_epochs": args.epochs, "default_root_dir": str(workdir), "enable_progress_bar": False,
                    "enable_model_summary": False},
        "checkpoint": {"dirpath": str(workdir / "checkpoints")},
        "model": {
            "class_path": "lightning_peft.TokenClassifier",
            "init_args": {
                "backbone": {"pretrained_model_name_or_path": args.model},
                "peft": {"class_path": "peft.LoraConfig", "init_args": {
                    "r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["query", "value"]}},
                **({"training": {"lr": args.lr}} if args.lr is not None else {}),
            },
        },
        "data": {
            "class_path": "lightning_peft.TokenClassificationDataModule",
            "init_args": {"train_file": args.train_file, "validation_file": str(args.data_dir / "valid.txt"),
                          "test_file": str(args.data_dir / "test.txt"), "batch_size": args.batch_size,
                          "max_length": args.max_length},
        },
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    cli = LightningPeftCLI(args=["fit", "--config", str(path), *args.cli_args])
    seconds = time.perf_counter() - start
    test = LightningPeftCLI(args=["test", "--config", str(path), "--ckpt_path", "best", *args.cli_args])
    metrics = {name: float(value) for name, value in test.trainer.callback_metrics.items()}
    return {
        "train_seconds": seconds,  # loading the model and validating after each epoch included
        "train_samples_per_s": len(cli.datamodule.datasets["train"]) * args.epochs / seconds,
        "test_f1": metrics["test/f1"],
        "lr": cli.model.learning_rate,  # with training.lr: auto, the rate the range test found
    }


def run_ours(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    return (run_lightning_peft_yaml if args.worker == "lightning_peft_yaml" else run_lightning_peft)(args, workdir)


def run_hf_trainer(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import numpy as np
    from datasets import Dataset
    from peft import TaskType, get_peft_model
    from seqeval.metrics import f1_score
    from transformers import (
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        Trainer,
        set_seed,
    )

    from lightning_peft.data.token_classification import read_conll

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train, test = read_conll(Path(args.train_file)), read_conll(args.data_dir / "test.txt")
    labels = sorted({t for row in train["ner_tags"] for t in row})
    label2id = {name: i for i, name in enumerate(labels)}

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=args.max_length)
        rows = []
        for i, tags in enumerate(batch["ner_tags"]):
            previous, row = None, []
            for word in encoded.word_ids(i):
                row.append(-100 if word is None or word == previous else label2id[tags[word]])
                previous = word
            rows.append(row)
        encoded["labels"] = rows
        return encoded

    columns = ["tokens", "ner_tags", "line"]
    train_set: Dataset = train.map(encode, batched=True, remove_columns=columns)
    test_set: Dataset = test.map(encode, batched=True, remove_columns=columns)
    model = AutoModelForTokenClassification.from_pretrained(
        args.model, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id
    )
    model = get_peft_model(model, lora_config(TaskType.TOKEN_CLS))
    training_args = hf_training_arguments(args, workdir, HF_GROUPED[args.worker], learning_rate=resolved_lr(args))

    def entity_f1(prediction: Any) -> dict[str, float]:
        predicted = np.argmax(prediction.predictions, -1)
        gold_tags, predicted_tags = [], []
        for pred_row, gold_row in zip(predicted, prediction.label_ids, strict=True):
            keep = gold_row != -100
            gold_tags.append([labels[t] for t in gold_row[keep]])
            predicted_tags.append([labels[t] for t in pred_row[keep]])
        return {"f1": f1_score(gold_tags, predicted_tags)}

    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_set, eval_dataset=test_set,
        data_collator=DataCollatorForTokenClassification(tokenizer), compute_metrics=entity_f1,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {
        "train_seconds": seconds,
        "train_samples_per_s": len(train_set) * args.epochs / seconds,
        "test_f1": trainer.evaluate()["eval_f1"],
    }


def training_sentences(data_dir: Path, count: int, out: Path, entity_share: float | None = None) -> None:
    """``count`` sentences of train.txt as a CoNLL file: the first ones, or (``entity_share``) a seeded sample in
    which only that share of sentences holds an entity (the low-resource, rare-entity setting)."""
    import random

    from lightning_peft.data.token_classification import read_conll

    data = read_conll(data_dir / "train.txt")
    if entity_share is None:
        data = data.select(range(count))
    else:
        with_entities = [i for i, tags in enumerate(data["ner_tags"]) if any(t != "O" for t in tags)]
        without = sorted(set(range(len(data))) - set(with_entities))
        rng = random.Random(0)
        n_entities = round(count * entity_share)
        rows = rng.sample(with_entities, n_entities) + rng.sample(without, count - n_entities)
        data = data.select(sorted(rows))
    with open(out, "w", encoding="utf-8") as f:
        for words, tags in zip(data["tokens"], data["ner_tags"], strict=True):
            f.write("".join(f"{w} {t}\n" for w, t in zip(words, tags, strict=True)) + "\n")


def learning_rate(text: str) -> float | None:
    """``--lr``: a number, or ``default`` (``None``: lightning-peft's default for the method)."""
    return None if text in ("default", "None") else float(text)


def resolved_lr(args: argparse.Namespace) -> float:
    """The learning rate every run trains with: ``--lr``, or lightning-peft's default for LoRA."""
    from peft import LoraConfig

    from lightning_peft.training import default_learning_rate

    return args.lr if args.lr is not None else default_learning_rate(LoraConfig())


def main() -> None:
    parser = base_parser(__doc__, "conll2003", RUNS, seeds=[42])
    parser.add_argument("--setting", choices=SETTINGS, default="standard", help="standard: the first 4,000 training "
                        "sentences; low_resource: 3,400 sentences of which 25%% hold an entity")
    parser.add_argument("--train-sentences", type=int, default=None, help="default: the setting's")
    parser.add_argument("--cli-args", nargs=argparse.REMAINDER, default=[],
                        help="lightning_peft_yaml: extra `lightning-peft` arguments (e.g. --trainer.gradient_clip_val "
                        "1.0), to measure what a default changes; must come last")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=learning_rate, default=5e-4, help="a number, or `default`: lightning-peft's "
                        "default for LoRA, which the lightning_peft_yaml run leaves to the CLI (no lr in its YAML)")
    args = parser.parse_args()
    if args.worker:
        work(args, run_ours, run_hf_trainer)
        return

    if not (args.data_dir / "train.txt").is_file():
        sys.exit(f"error: --data-dir {args.data_dir}: no train.txt there (expected the CoNLL-2003 layout)")
    model = args.model or default_model()
    default_count, entity_share = SETTINGS[args.setting]
    args.train_sentences = args.train_sentences or default_count
    settings = {k: getattr(args, k) for k in ("setting", "train_sentences", "batch_size", "max_length", "epochs",
                                              "seeds", "cli_args")}
    settings.update(lr=resolved_lr(args), yaml_sets_lr=args.lr is not None)
    settings["entity_share"] = entity_share
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.txt"
        training_sentences(args.data_dir, args.train_sentences, train_file, entity_share)
        worker_args = [
            "--model", model, "--train-file", str(train_file), "--data-dir", str(args.data_dir),
            *training_worker_args(args), *(["--cli-args", *args.cli_args] if args.cli_args else []),
        ]
        per_seed = run_all(__file__, args.runs, args.seeds, worker_args)
    results = {name: summarise(records, "test_f1") for name, records in per_seed.items()}
    print_table(
        results,
        baselines=("hf_trainer", "hf_trainer_grouped"),
        columns=[
            ("test F1", 10, lambda r: f"{100 * r['test_f1']:.2f}"),
            ("peak RSS MB", 13, lambda r: f"{r['peak_rss_mb']:.0f}"),
        ],
    )
    write_json(args.json, results, {**settings, "model": model})


if __name__ == "__main__":
    main()
