"""Robust training on SST-2: clean and perturbed dev accuracy of plain LoRA vs LoRA with each robustness option.

    python benchmarks/robustness.py --json benchmarks/results/robustness.json

Setting: the packaged MiniLM-L6 encoder, LoRA r=8 (alpha 16, dropout 0.1) on query/value (``--target-modules``
changes it for every run), 4,000 shuffled SST-2
training rows (the classification benchmark's sample), batch 32, max_length 64, 1 epoch, AdamW lr 2e-3 (weight
decay 0.01), linear decay, gradients clipped at 1.0, our default batching; seeds 42, 43, 44. Configurations:

- ``lora``: plain LoRA;
- ``lora_fgm``: + ``AdversarialTraining(method="fgm", epsilon=0.1)`` (the callback's defaults);
- ``lora_pgd``: + ``AdversarialTraining(method="pgd", epsilon=0.1, alpha=0.03, steps=3)``;
- ``lora_rdrop``: + ``regularization.rdrop_alpha=1.0``;
- ``lora_label_smoothing``: + ``regularization.label_smoothing=0.1``;
- ``lora_l2``: + ``regularization.trainable_l2=1e-3`` (L2 on the adapter and head only);
- ``lora_augment``: + ``data.augmentation: {char_swap: 0.1, word_dropout: 0.1}`` (``TextAugmentation``, drawn anew
  each epoch); ``lora_augment_half``: ``{char_swap: 0.2, word_dropout: 0.2, row_probability: 0.5}`` (the test
  sets' rates on half of the rows); ``lora_augment_strong``: ``{char_swap: 0.2, word_dropout: 0.2}`` (every row);
  ``lora_augment_consistency``: the strong rates with ``consistency: 1.0`` (each row and its augmented view in the
  batch: the clean rows' loss plus the KL from each row's prediction to its view's — twice the compute per batch);
- ``lora_mixup``: + ``mixup_alpha=0.4`` (mixup of the pooled representation, soft labels).

Each model is evaluated on the full dev set as is, and on perturbed copies of it that this script makes,
deterministically (one ``random.Random`` per sentence, seeded by ``--perturbation-seed``, the perturbation and the
row): ``char_swap`` (each word of 4+ letters, with probability 0.2, has two adjacent inner letters swapped),
``char_drop`` (likewise, one inner letter dropped), ``word_drop_10`` / ``word_drop_20`` (each word dropped with
probability 0.1 / 0.2, the first kept if all go) — ``perturbed`` in the table is the mean over those four sets —
and ``word_swap`` (each word swapped with the next with probability 0.2). The perturbations are
``lightning_peft.TextAugmentation``'s, so training augmentation and evaluation noise are the same code. Kinds that
``lora_augment`` does not train on (``char_drop``, ``word_swap``) give ``unseen_accuracy`` and ``drop_unseen``
(clean minus their mean); ``drop`` is clean minus ``perturbed``. ``clean_ece`` is the clean dev set's expected
calibration error (15 bins).
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classification import add_sst2_arguments, lora_config, sst2_workers  # noqa: E402
from common import QUIET, base_parser, report, run_all, summarise, timed_fit, write_json  # noqa: E402

RUNS = (
    "lora", "lora_fgm", "lora_pgd", "lora_rdrop", "lora_label_smoothing", "lora_l2", "lora_augment",
    "lora_augment_half", "lora_augment_strong", "lora_augment_consistency", "lora_mixup",
)
#: run → what it adds to plain LoRA: AdversarialTraining options, Regularization options, data augmentation, mixup
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "lora": {},
    "lora_fgm": {"adversarial": {"method": "fgm", "epsilon": 0.1}},
    "lora_pgd": {"adversarial": {"method": "pgd", "epsilon": 0.1, "alpha": 0.03, "steps": 3}},
    "lora_rdrop": {"regularization": {"rdrop_alpha": 1.0}},
    "lora_label_smoothing": {"regularization": {"label_smoothing": 0.1}},
    "lora_l2": {"regularization": {"trainable_l2": 1e-3}},
    "lora_augment": {"augmentation": {"char_swap": 0.1, "word_dropout": 0.1}},
    "lora_augment_half": {"augmentation": {"char_swap": 0.2, "word_dropout": 0.2, "row_probability": 0.5}},
    "lora_augment_strong": {"augmentation": {"char_swap": 0.2, "word_dropout": 0.2}},
    "lora_augment_consistency": {"augmentation": {"char_swap": 0.2, "word_dropout": 0.2, "consistency": 1.0}},
    "lora_mixup": {"mixup_alpha": 0.4},
}
#: perturbation kinds that ``lora_augment`` never sees in training
UNSEEN = ("char_drop", "word_swap")
DEFAULT_LR = 2e-3


# -- perturbations --------------------------------------------------------------------------------------------
#: perturbation set → the augmentation that makes it (``perturbed`` = the mean over the first four)
PERTURBATIONS: dict[str, dict[str, float]] = {
    "char_swap": {"char_swap": 0.2},
    "char_drop": {"char_drop": 0.2},
    "word_drop_10": {"word_dropout": 0.1},
    "word_drop_20": {"word_dropout": 0.2},
    "word_swap": {"word_swap": 0.2},
}
AVERAGED = ("char_swap", "char_drop", "word_drop_10", "word_drop_20")


def perturb(sentence: str, name: str, row: int, seed: int) -> str:
    from lightning_peft import TextAugmentation

    return TextAugmentation(**PERTURBATIONS[name]).text(sentence, random.Random(f"{seed}:{name}:{row}"))


def write_perturbed_dev_sets(dev_file: Path, out_dir: Path, seed: int) -> dict[str, Path]:
    """``clean`` (the dev file itself) and one TSV per perturbation, same rows and labels."""
    with open(dev_file, encoding="utf-8") as f:
        header, *rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    text = header.index("sentence")
    files = {"clean": dev_file}
    for name in PERTURBATIONS:
        files[name] = out_dir / f"dev_{name}.tsv"
        with open(files[name], "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
            writer.writerow(header)
            for i, row in enumerate(rows):
                writer.writerow([perturb(v, name, i, seed) if j == text else v for j, v in enumerate(row)])
    return files


# -- one run --------------------------------------------------------------------------------------------------
def run_configuration(args: argparse.Namespace) -> dict[str, Any]:
    from functools import partial

    import lightning.pytorch as pl
    import torch

    from lightning_peft import (
        AdversarialTraining,
        BackboneConfig,
        ClassificationDataModule,
        SequenceClassifier,
        TrainingConfig,
    )

    configuration = CONFIGURATIONS[args.worker]
    pl.seed_everything(args.seed, verbose=False)
    dm = ClassificationDataModule(
        tokenizer=args.model, train_file=args.train_file, validation_file=args.dev_file, text_column="sentence",
        max_length=args.max_length, batch_size=args.batch_size, seed=args.seed,
        augmentation=configuration.get("augmentation"),
    )
    model = SequenceClassifier(
        BackboneConfig(pretrained_model_name_or_path=args.model), lora_config(target_modules=args.target_modules),
        labels=dm.labels,
        optimizer=partial(torch.optim.AdamW, weight_decay=0.01), mixup_alpha=configuration.get("mixup_alpha", 0.0),
        training=TrainingConfig(lr=args.lr, regularization=configuration.get("regularization", {})),
    )
    adversarial = configuration.get("adversarial")
    callbacks = [AdversarialTraining(**adversarial)] if adversarial else []
    seconds = timed_fit(model, dm, args.epochs, limit_val_batches=0, callbacks=callbacks)
    record: dict[str, Any] = {"train_seconds": seconds}
    for name in ("clean", *PERTURBATIONS):
        dev = dm if name == "clean" else ClassificationDataModule(  # the training datamodule holds the clean dev set
            tokenizer=args.model, validation_file=str(Path(args.perturbed_dir) / f"dev_{name}.tsv"),
            text_column="sentence", labels=dm.labels, max_length=args.max_length, batch_size=args.batch_size,
        )
        metrics = pl.Trainer(**QUIET).validate(model, datamodule=dev, verbose=False)[0]
        record[f"{name}_accuracy"] = metrics["val/accuracy"]
        if name == "clean":
            record["clean_ece"] = metrics["val/ece"]
    record["perturbed_accuracy"] = sum(record[f"{name}_accuracy"] for name in AVERAGED) / len(AVERAGED)
    record["unseen_accuracy"] = sum(record[f"{name}_accuracy"] for name in UNSEEN) / len(UNSEEN)
    record["drop"] = record["clean_accuracy"] - record["perturbed_accuracy"]
    record["drop_unseen"] = record["clean_accuracy"] - record["unseen_accuracy"]
    return record


def print_robustness_table(results: dict[str, dict[str, Any]]) -> None:
    sets = ["clean", *PERTURBATIONS, "perturbed"]
    header = (f"{'run':<22}{'train s':>9}" + "".join(f"{name:>13}" for name in sets)
              + f"{'drop':>7}{'drop unseen':>13}{'clean ECE':>11}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<22}{r['train_seconds']:>9.0f}" + "".join(f"{100 * r[f'{s}_accuracy']:>13.2f}" for s in sets)
              + f"{100 * r['drop']:>7.2f}{100 * r['drop_unseen']:>13.2f}{r['clean_ece']:>11.4f}")
    if "lora" in results:
        base = results["lora"]
        print("\nvs plain LoRA (points, means over seeds; sd of clean accuracy over seeds in brackets):")
        for name, r in results.items():
            if name == "lora":
                continue
            clean = 100 * (r["clean_accuracy"] - base["clean_accuracy"])
            perturbed = 100 * (r["perturbed_accuracy"] - base["perturbed_accuracy"])
            print(f"  {name:<22} clean {clean:+.2f} (sd {100 * r['clean_accuracy_std']:.2f}), "
                  f"perturbed {perturbed:+.2f}")


def main() -> None:
    parser = base_parser(__doc__, "sst2", RUNS, seeds=[42, 43, 44])
    add_sst2_arguments(parser)
    parser.set_defaults(lr=DEFAULT_LR)
    parser.add_argument("--perturbation-seed", type=int, default=0, help="seed of the perturbed dev sets")
    parser.add_argument("--perturbed-dir", help=argparse.SUPPRESS)
    parser.add_argument("--target-modules", nargs="+", default=["query", "value"],
                        help="the LoRA adapter's modules in every run (e.g. query key value dense: all linear layers)")
    args = parser.parse_args()
    if args.worker:
        report(run_configuration(args))
        return

    settings = {
        k: getattr(args, k)
        for k in ("train_rows", "batch_size", "max_length", "epochs", "lr", "seeds", "data_seed", "perturbation_seed",
                  "target_modules")
    }
    settings["perturbations"] = PERTURBATIONS
    with sst2_workers(args) as (model, worker_args), tempfile.TemporaryDirectory() as tmp:
        write_perturbed_dev_sets(args.data_dir / "dev.tsv", Path(tmp), args.perturbation_seed)
        per_seed = run_all(__file__, args.runs, args.seeds,
                           [*worker_args, "--perturbed-dir", tmp, "--target-modules", *args.target_modules])
    results = {name: {"run": name, **summarise(records, "clean_accuracy")} for name, records in per_seed.items()}
    for name, records in per_seed.items():
        results[name]["perturbed_accuracy_std"] = statistics.pstdev(r["perturbed_accuracy"] for r in records)
    print_robustness_table(results)
    configurations = {name: CONFIGURATIONS[name] for name in args.runs}
    write_json(args.json, results, {**settings, "model": model, "configurations": configurations})


if __name__ == "__main__":
    main()
