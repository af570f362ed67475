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

Learning rates: ``<method>`` trains at the rate the method's preset ships with (``training.lr: null``, the measured
per-method default of ``lightning_peft.training.DEFAULT_LEARNING_RATES``); ``<method>_auto`` with ``training.lr:
auto`` (the range test's cost is recorded as ``search_seconds`` and ``search_share``, its part of the fit without
it); ``<method>_probe_best`` is the best, by mean dev accuracy over the seeds, of a grid of the shipped rate times
each of ``--probe-factors`` (the factor-1 runs are ``<method>``'s when that is run too).

    python benchmarks/peft_methods.py --runs lora lora_auto lora_probe_best --json out.json

``--method-set METHOD.FIELD=VALUE`` changes one field of a preset for every run of that method (ours and HF's), as
the AdaLoRA schedule measurements do: ``--runs adalora hf_adalora --method-set adalora.tfinal=0.5``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import tempfile
import time
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
    run_worker,
    summarise,
    timed_fit,
    write_json,
)

PRESETS = REPO / "configs" / "peft"
METHODS = ("lora", "rslora", "dora", "pissa", "olora", "adalora", "ia3", "loha", "lokr", "vera", "prefix_tuning",
           "prompt_tuning", "p_tuning")
AUTO_RUNS = tuple(f"{method}_auto" for method in METHODS)
PROBE_RUNS = tuple(f"{method}_probe_best" for method in METHODS)
#: the HF ``Trainer`` + peft on the AdaLoRA preset: the method apart from our wiring (not among the default runs)
HF_RUNS = ("hf_adalora",)
#: the grid behind ``<method>_probe_best``: the method's shipped rate times each factor
PROBE_FACTORS = (1 / 3, 1.0, 3.0)


def method_of(run: str) -> str:
    """The preset a run trains: ``lora`` for ``lora``, ``lora_auto``, ``lora_probe_best``; ``adalora`` for
    ``hf_adalora``."""
    return run.removeprefix("hf_").removesuffix("_auto").removesuffix("_probe_best")


def learning_rates(args: argparse.Namespace) -> dict[str, float]:
    """Each method's learning rate: the default its preset ships with, then ``--method-lr name=value`` overrides."""
    from lightning_peft.training import default_learning_rate

    rates = {name: default_learning_rate(preset_peft_config(name)) for name in METHODS}
    for item in args.method_lr:
        name, _, value = item.partition("=")
        if name not in rates:
            sys.exit(f"error: --method-lr {item!r}: unknown method {name!r}")
        rates[name] = float(value)
    return rates


def preset_peft_config(method: str, changes: list[str] = ()) -> Any:
    """The method's preset config, with each ``METHOD.FIELD=VALUE`` of ``changes`` for it applied (YAML values)."""
    spec = yaml.safe_load((PRESETS / f"{method}.yaml").read_text())["model"]["init_args"]["peft"]
    settings = dict(spec["init_args"])
    for item in changes:
        target, _, value = item.partition("=")
        name, _, key = target.partition(".")
        if name not in METHODS or not key:
            sys.exit(f"error: --method-set {item!r}: expected METHOD.FIELD=VALUE with METHOD one of {METHODS}")
        if name == method:
            settings[key] = yaml.safe_load(value)
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**settings)


def check_method_set(changes: list[str]) -> None:
    """Build each preset that ``changes`` name once, so that a wrong METHOD or FIELD stops the benchmark before any
    worker starts, with peft's own message for a field its config does not take."""
    named = {item.partition(".")[0] for item in changes}
    for method in sorted(named & set(METHODS)) or METHODS[:1]:  # an unknown METHOD fails in any preset's loop
        try:
            preset_peft_config(method, changes)
        except (TypeError, ValueError) as error:
            sys.exit(f"error: --method-set for {method}: {error}")


def run_hf_adalora(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The AdaLoRA preset through the HF ``Trainer`` + peft, at our learning rate and budget: ``update_and_allocate``
    after each optimizer step and before gradients are zeroed (``on_optimizer_step``), as peft's docs prescribe;
    peft adds the orthogonal regulariser to the loss itself."""
    from peft import TaskType
    from transformers import TrainerCallback

    config = preset_peft_config("adalora", args.method_set)
    rows = len(Path(args.train_file).read_text(encoding="utf-8").splitlines()) - 1  # the header
    steps = math.ceil(rows / args.batch_size) * args.epochs
    config.resolve_schedule(steps)
    config.task_type = TaskType.SEQ_CLS
    args.lr = learning_rates(args)["adalora"]

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
    from lightning_peft.callbacks import AdaLoRAScheduler, LearningRateSearch

    class TimedSearch(LearningRateSearch):
        seconds = 0.0

        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            start = time.perf_counter()
            super().on_fit_start(trainer, pl_module)
            self.seconds = time.perf_counter() - start

    pl.seed_everything(args.seed, verbose=False)
    dm = ClassificationDataModule(
        tokenizer=args.model, train_file=args.train_file, validation_file=args.dev_file, text_column="sentence",
        max_length=args.max_length, batch_size=args.batch_size, seed=args.seed,
    )
    method = method_of(args.worker)
    auto = args.worker.endswith("_auto")
    lr = "auto" if auto else args.probe_lr or learning_rates(args)[method]
    try:
        model = SequenceClassifier(
            BackboneConfig(pretrained_model_name_or_path=args.model), preset_peft_config(method, args.method_set),
            labels=dm.labels, optimizer=partial(torch.optim.AdamW, weight_decay=0.01),
            training=TrainingConfig(lr=lr, **({"sequence_packing": False, "micro_batch_size": None}
                                              if args.padded_batches else {})),
        )
    except LightningPeftError as err:
        return {"supported": False, "reason": str(err)}
    trainable, total = count_parameters(model)
    search = TimedSearch()
    callbacks = [search] if auto else []
    callbacks += [AdaLoRAScheduler(heatmap=False)] if method == "adalora" else []
    seconds = timed_fit(model, dm, args.epochs, limit_val_batches=0, callbacks=callbacks, default_root_dir=workdir)
    metrics = pl.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]
    export = model.export(workdir / "export")
    searched = {"search_seconds": search.seconds, "search_share": search.seconds / (seconds - search.seconds),
                "lr_found": search.chosen_lr is not None, "range_test": {"lrs": search.lrs, "losses": search.losses}
                } if auto else {}
    return {
        "supported": True,
        "lr": model.learning_rate,
        **searched,
        "trainable_params": trainable,
        "trainable_percent": 100 * trainable / total,
        "train_seconds": seconds,
        "train_samples_per_s": len(dm.datasets["train"]) * args.epochs / seconds,
        "dev_accuracy": metrics["val/accuracy"],
        "adapter_bytes": dir_bytes(export / "adapter"),
    }


def run_probe_grid(run: str, args: argparse.Namespace, worker_args: list[str],
                   shipped: list[dict[str, Any]] | None) -> dict[str, Any]:
    """``<method>_probe_best``: the grid of :data:`PROBE_FACTORS` around the shipped rate, every seed each, extended
    past an edge (by the grid's outer ratio, at most ``--probe-extend`` rates) while the best rate is on it, so the
    reference is a best between two worse rates, not the end of a range; the rate with the best mean dev accuracy,
    its records, and every rate's mean."""
    shipped_lr = learning_rates(args)[method_of(run)]
    grid: dict[float, list[dict[str, Any]]] = {}

    def probe(rate: float) -> list[dict[str, Any]]:
        if math.isclose(rate, shipped_lr) and shipped is not None:
            grid[rate] = shipped
        else:
            grid[rate] = []
            for seed in args.seeds:
                print(f"running {run} at lr {rate:.2g} (seed {seed}) …", flush=True)
                grid[rate].append(run_worker(__file__, run, seed, [*worker_args, "--probe-lr", str(rate)]))
        return grid[rate]

    def mean_accuracy(rate: float) -> float:
        return statistics.mean(r["dev_accuracy"] for r in grid[rate])

    for factor in sorted(args.probe_factors):
        records = probe(shipped_lr * factor)
        if not records[0]["supported"]:
            return {"method": run, "supported": False, "reason": records[0]["reason"]}
    for _ in range(args.probe_extend):
        rates = sorted(grid)
        best = max(range(len(rates)), key=lambda i: mean_accuracy(rates[i]))
        if 0 < best < len(rates) - 1 or len(rates) < 2:
            break
        probe(rates[-1] ** 2 / rates[-2] if best else rates[0] ** 2 / rates[1])
    best = max(grid, key=mean_accuracy)
    return {"method": run, "supported": True, **summarise(grid[best], "dev_accuracy"),
            "grid": {f"{rate:.3g}": mean_accuracy(rate) for rate in sorted(grid)}}


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
    print_auto_table(results)


def print_auto_table(results: dict[str, dict[str, Any]]) -> None:
    """``lr: auto`` against the best probed rate, per method that has both runs."""
    methods = [m for m in METHODS if results.get(f"{m}_auto", {}).get("supported")
               and results.get(f"{m}_probe_best", {}).get("supported")]
    if not methods:
        return
    header = f"\n{'method':<15}{'auto lr':>10}{'auto acc':>10}{'best lr':>10}{'best acc':>10}{'gap':>8}{'search':>9}"
    print(header)
    print("-" * len(header.strip()))
    for m in methods:
        auto, best = results[f"{m}_auto"], results[f"{m}_probe_best"]
        gap = 100 * (auto["dev_accuracy"] - best["dev_accuracy"])
        print(f"{m:<15}{auto['lr']:>10.2g}{100 * auto['dev_accuracy']:>10.2f}{best['lr']:>10.2g}"
              f"{100 * best['dev_accuracy']:>10.2f}{gap:>+8.2f}{100 * auto['search_share']:>8.0f}%")
    print("(gap: points of mean dev accuracy, auto minus best probed; search: the range test's time over the fit's)")


def main() -> None:
    parser = base_parser(__doc__, "sst2", METHODS + AUTO_RUNS + PROBE_RUNS + HF_RUNS, seeds=[42, 43, 44])
    parser.set_defaults(runs=list(METHODS))
    add_sst2_arguments(parser)  # --lr is replaced per method (the presets' defaults, --method-lr)
    parser.add_argument("--method-lr", nargs="*", default=[], metavar="METHOD=LR", help="override a method's lr")
    parser.add_argument("--method-set", nargs="*", default=[], metavar="METHOD.FIELD=VALUE",
                        help="change a field of a method's preset (e.g. adalora.tfinal=0.5)")
    parser.add_argument("--probe-factors", nargs="+", type=float, default=list(PROBE_FACTORS),
                        help="the grid of <method>_probe_best: the shipped rate times each")
    parser.add_argument("--probe-extend", type=int, default=2,
                        help="rates <method>_probe_best adds past the grid's edge while its best rate is there")
    parser.add_argument("--probe-lr", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--padded-batches", action="store_true",
                        help="compute our batches as the HF Trainer does (one padded pass, no packing)")
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as tmp:
            report((run_hf_adalora if args.worker in HF_RUNS else run_method)(args, Path(tmp)))
        return

    check_method_set(args.method_set)
    settings = {k: getattr(args, k) for k in ("train_rows", "batch_size", "max_length", "epochs", "seeds", "data_seed",
                                              "padded_batches", "probe_factors", "probe_extend", "method_set")}
    with sst2_workers(args) as (model, worker_args):
        worker_args = [*worker_args, *["--padded-batches"] * args.padded_batches, "--method-lr", *args.method_lr,
                       "--method-set", *args.method_set]
        per_seed = run_all(__file__, [r for r in args.runs if r not in PROBE_RUNS], args.seeds, worker_args)
        results = {}
        for name, records in per_seed.items():
            if not records[0]["supported"]:
                results[name] = {"method": name, "supported": False, "reason": records[0]["reason"]}
            else:
                results[name] = {"method": name, "supported": True, **summarise(records, "dev_accuracy")}
        for name in [r for r in args.runs if r in PROBE_RUNS]:
            results[name] = run_probe_grid(name, args, worker_args, per_seed.get(method_of(name)))
    print_methods_table(results)
    rates = learning_rates(args)
    write_json(args.json, results, {**settings, "model": model, "learning_rates": {
        n: rates[method_of(n)] for n in args.runs if n not in AUTO_RUNS}})


if __name__ == "__main__":
    main()
