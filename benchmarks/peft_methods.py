"""PEFT methods on SST-2: every preset in configs/peft/ through lightning-peft, on the classification benchmark's
setting, one table of trainable parameters, train samples/s, dev accuracy and adapter size.

    python benchmarks/peft_methods.py --json benchmarks/results/peft_methods.json

Setting: the packaged MiniLM-L6 encoder, 4,000 shuffled SST-2 training rows (the same sample as
``benchmarks/classification.py``), the full dev set, batch 32, max_length 64, 1 epoch, AdamW (weight decay 0.01),
linear decay, gradients clipped at 1.0, our default batching; each method exactly as its shipped preset
configures it (``target_modules`` left to peft's BERT defaults: query/value, IA3 key/value/output.dense), with a
learning rate per method (below: adapters that scale rather than add, and soft prompts, need larger steps). AdaLoRA
starts at rank 12 and ends at an average rank 8, the budget of LoRA r=8, over the same 125 optimizer steps
(``AdaLoRAScheduler`` sets ``total_step`` from the fit). Each run is a fresh subprocess; adapter KB is the size of
``adapter/`` as exported (weights + config + model card). Methods peft cannot run on this model are listed with
the reason instead of numbers.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classification import add_sst2_arguments, run_hf_trainer, sst2_workers  # noqa: E402
from common import (  # noqa: E402
    QUIET,
    REPO,
    base_parser,
    dir_bytes,
    report,
    run_all,
    summarise,
    timed_fit,
    write_json,
)

PRESETS = REPO / "configs" / "peft"
METHODS = ("lora", "rslora", "dora", "pissa", "olora", "adalora", "ia3", "loha", "lokr", "vera", "prefix_tuning",
           "prompt_tuning", "p_tuning")
#: the HF ``Trainer`` + peft on the AdaLoRA preset: the method apart from our wiring (not among the default runs)
HF_RUNS = ("hf_adalora",)
#: learning rate per method (LoRA's is the classification benchmark's)
LEARNING_RATES = {"ia3": 5e-3, "loha": 3e-3, "lokr": 3e-3, "vera": 5e-3, "prefix_tuning": 1e-2, "prompt_tuning": 3e-2,
                  "p_tuning": 3e-3}
DEFAULT_LR = 5e-4


def learning_rates(args: argparse.Namespace) -> dict[str, float]:
    """Each method's learning rate: :data:`LEARNING_RATES`, then ``--method-lr name=value`` overrides; an HF run
    takes its method's (``hf_adalora``: ``adalora``'s)."""
    rates = {name: LEARNING_RATES.get(name, DEFAULT_LR) for name in METHODS}
    for item in args.method_lr:
        name, _, value = item.partition("=")
        if name not in rates:
            sys.exit(f"error: --method-lr {item!r}: unknown method {name!r}")
        rates[name] = float(value)
    return {**rates, **{run: rates[run.removeprefix("hf_")] for run in HF_RUNS}}


def preset_peft_config(method: str) -> Any:
    spec = yaml.safe_load((PRESETS / f"{method}.yaml").read_text())["model"]["init_args"]["peft"]
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**spec["init_args"])


def run_hf_adalora(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The AdaLoRA preset through the HF ``Trainer`` + peft, at our learning rate and budget: ``update_and_allocate``
    after each optimizer step and before gradients are zeroed (``on_optimizer_step``), as peft's docs prescribe;
    peft adds the orthogonal regulariser to the loss itself."""
    from peft import TaskType
    from transformers import TrainerCallback

    config = preset_peft_config("adalora")
    rows = len(Path(args.train_file).read_text(encoding="utf-8").splitlines()) - 1  # the header
    steps = math.ceil(rows / args.batch_size) * args.epochs
    config.resolve_schedule(steps)
    config.task_type = TaskType.SEQ_CLS
    args.lr = learning_rates(args)[args.worker]

    class UpdateAndAllocate(TrainerCallback):
        def on_optimizer_step(self, training_args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
            model.base_model.update_and_allocate(state.global_step)

    record = run_hf_trainer(args, workdir, peft_config=config, callbacks=(UpdateAndAllocate(),))
    return {"supported": True, "lr": args.lr, **{k: record[k] for k in ("train_seconds", "train_samples_per_s",
                                                                          "dev_accuracy")}}


def run_method(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from functools import partial

    import lightning.pytorch as pl
    import torch

    from lightning_peft import (
        BackboneConfig,
        ClassificationDataModule,
        LightningPeftError,
        SequenceClassifier,
        TrainingConfig,
    )
    from lightning_peft.backbone import count_parameters
    from lightning_peft.callbacks import AdaLoRAScheduler

    pl.seed_everything(args.seed, verbose=False)
    dm = ClassificationDataModule(
        tokenizer=args.model, train_file=args.train_file, validation_file=args.dev_file, text_column="sentence",
        max_length=args.max_length, batch_size=args.batch_size, seed=args.seed,
    )
    lr = learning_rates(args)[args.worker]
    try:
        model = SequenceClassifier(
            BackboneConfig(pretrained_model_name_or_path=args.model), preset_peft_config(args.worker),
            labels=dm.labels, optimizer=partial(torch.optim.AdamW, weight_decay=0.01),
            training=TrainingConfig(lr=lr, **({"sequence_packing": False, "micro_batch_size": None}
                                              if args.padded_batches else {})),
        )
    except LightningPeftError as err:
        return {"supported": False, "reason": str(err)}
    trainable, total = count_parameters(model)
    callbacks = [AdaLoRAScheduler(heatmap=False)] if args.worker == "adalora" else []
    seconds = timed_fit(model, dm, args.epochs, limit_val_batches=0, callbacks=callbacks)
    metrics = pl.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]
    export = model.export(workdir / "export")
    return {
        "supported": True,
        "lr": lr,
        "trainable_params": trainable,
        "trainable_percent": 100 * trainable / total,
        "train_seconds": seconds,
        "train_samples_per_s": len(dm.datasets["train"]) * args.epochs / seconds,
        "dev_accuracy": metrics["val/accuracy"],
        "adapter_bytes": dir_bytes(export / "adapter"),
    }


def print_methods_table(results: dict[str, dict[str, Any]]) -> None:
    header = (f"{'method':<15}{'trainable':>11}{'%':>8}{'lr':>9}{'samples/s':>11}{'dev acc (mean ± sd)':>22}"
              f"{'adapter KB':>12}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        if not r.get("supported", True):
            print(f"{name:<15}  not supported: {r['reason']}")
            continue
        accuracy = f"{100 * r['dev_accuracy']:.2f} ± {100 * r['dev_accuracy_std']:.2f}"
        counts = (f"{r['trainable_params']:>11,.0f}{r['trainable_percent']:>8.3f}" if "trainable_params" in r
                  else f"{'—':>11}{'—':>8}")  # the HF runs report accuracy and speed only
        size = f"{r['adapter_bytes'] / 1024:>12.0f}" if "adapter_bytes" in r else f"{'—':>12}"
        print(f"{name:<15}{counts}{r['lr']:>9.0e}{r['train_samples_per_s']:>11.1f}{accuracy:>22}{size}")
    if "lora" in results and "adalora" in results and results["adalora"].get("supported", True):
        gap = 100 * (results["adalora"]["dev_accuracy"] - results["lora"]["dev_accuracy"])
        verdict = "reaches" if gap >= 0 else f"falls {-gap:.2f} points short of"
        print(f"\nAdaLoRA (average rank 8) {verdict} LoRA r=8's dev accuracy ({gap:+.2f} points, means over seeds)")


def main() -> None:
    parser = base_parser(__doc__, "sst2", METHODS + HF_RUNS, seeds=[42, 43, 44])
    parser.set_defaults(runs=list(METHODS))
    add_sst2_arguments(parser)  # --lr is replaced per method (LEARNING_RATES, --method-lr)
    parser.add_argument("--method-lr", nargs="*", default=[], metavar="METHOD=LR", help="override a method's lr")
    parser.add_argument("--padded-batches", action="store_true",
                        help="compute our batches as the HF Trainer does (one padded pass, no packing)")
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as tmp:
            report((run_hf_adalora if args.worker in HF_RUNS else run_method)(args, Path(tmp)))
        return

    settings = {k: getattr(args, k) for k in ("train_rows", "batch_size", "max_length", "epochs", "seeds", "data_seed",
                                              "padded_batches")}
    with sst2_workers(args) as (model, worker_args):
        per_seed = run_all(__file__, args.runs, args.seeds, [*worker_args, *["--padded-batches"] * args.padded_batches,
                                                             "--method-lr", *args.method_lr])
    results = {}
    for name, records in per_seed.items():
        if not records[0]["supported"]:
            results[name] = {"method": name, "supported": False, "reason": records[0]["reason"]}
        else:
            results[name] = {"method": name, "supported": True, **summarise(records, "dev_accuracy")}
    print_methods_table(results)
    rates = learning_rates(args)
    write_json(args.json, results, {**settings, "model": model, "learning_rates": {n: rates[n] for n in args.runs}})


if __name__ == "__main__":
    main()
