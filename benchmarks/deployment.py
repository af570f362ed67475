"""Compressed exports on CPU: fp32 merged vs int8 (torchao) vs ONNX (fp32 and onnxruntime int8), from one fit.

    python benchmarks/deployment.py --json benchmarks/results/deployment.json

Setting: the packaged MiniLM-L6 encoder with LoRA r=8 (alpha 16, dropout 0.1) on query/value, fitted once on 4,000
shuffled SST-2 training rows (1 epoch, batch 32, max_length 64, the method's default lr 2e-3), then exported with
``lightning-peft``'s ``export --merge --quantize int8 --onnx`` (``PeftModule.export``). Each run is a fresh
process that loads one of the exported models and predicts the full SST-2 dev set (872 sentences) in file order:
pre-tokenised batches of 32 (dynamic padding) for ``sentences_per_s``, then one sentence at a time for
``sentences_per_s_batch1``; ``accuracy`` on the dev set; ``bytes_on_disk`` = the model file(s) of that run;
``peak_rss_mb`` = the process's peak resident memory. torch and onnxruntime use this machine's cores (2 here).

Runs: ``fp32_merged`` (``merged/``, transformers, eager), ``int8`` (``int8/``, dynamic int8 linear layers, compiled
with ``model.compile(dynamic=True)`` as the export's card says; compilation happens in a warm-up, reported as
``warmup_s``), ``onnx_fp32`` (``onnx/model.onnx``) and ``onnx_int8`` (``onnx/model_quantized.onnx``), both on
onnxruntime's CPU provider. Context runs: ``fp32_merged_compiled`` (does compiling alone buy the speed?) and
``int8_eager`` (``int8/`` as ``lightning-peft predict`` runs it, uncompiled).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classification import lora_config, sample_train_rows  # noqa: E402
from common import QUIET, base_parser, default_model, report, run_worker, timed_fit, write_json  # noqa: E402

RUNS = ("fp32_merged", "int8", "onnx_fp32", "onnx_int8", "fp32_merged_compiled", "int8_eager")
#: run → (directory inside the export, model file(s) it loads)
MODEL_FILES = {
    "fp32_merged": ("merged", ["model.safetensors"]),
    "fp32_merged_compiled": ("merged", ["model.safetensors"]),
    "int8": ("int8", ["model.safetensors"]),
    "int8_eager": ("int8", ["model.safetensors"]),
    "onnx_fp32": ("onnx", ["model.onnx"]),
    "onnx_int8": ("onnx", ["model_quantized.onnx"]),
}
COMPILED = {"fp32_merged_compiled", "int8"}


def fit_and_export(args: argparse.Namespace, export_dir: Path) -> dict[str, Any]:
    """Worker ``fit``: the LoRA fit of the setting, exported with merged/, int8/ and onnx/."""
    from functools import partial

    import lightning.pytorch as pl
    import torch

    from lightning_peft import BackboneConfig, ClassificationDataModule, SequenceClassifier, TrainingConfig

    pl.seed_everything(args.seed, verbose=False)
    dm = ClassificationDataModule(
        tokenizer=args.model, train_file=args.train_file, validation_file=args.dev_file, text_column="sentence",
        max_length=args.max_length, batch_size=args.batch_size, seed=args.seed,
    )
    model = SequenceClassifier(
        BackboneConfig(pretrained_model_name_or_path=args.model), lora_config(), labels=dm.labels,
        optimizer=partial(torch.optim.AdamW, weight_decay=0.01), training=TrainingConfig(lr=args.lr),
    )
    seconds = timed_fit(model, dm, args.epochs, limit_val_batches=0)
    accuracy = pl.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]["val/accuracy"]
    start = time.perf_counter()
    model.export(export_dir, dm.tokenizer, merge=True, quantize="int8", onnx=True)
    return {"train_seconds": seconds, "dev_accuracy_lightning": accuracy,
            "export_seconds": time.perf_counter() - start}


def dev_set(path: str) -> tuple[list[str], list[int]]:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def predictor(run: str, directory: Path) -> Any:
    """A function from a tokenised batch (numpy or torch) to logits (numpy), for ``run``'s model."""
    import numpy as np
    import torch

    if run.startswith("onnx"):
        import onnxruntime

        session = onnxruntime.InferenceSession(str(directory / MODEL_FILES[run][1][0]),
                                               providers=["CPUExecutionProvider"])
        names = {node.name for node in session.get_inputs()}
        return lambda batch: session.run(["logits"], {k: v.numpy() for k, v in batch.items() if k in names})[0]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    if run in COMPILED:
        model.compile(dynamic=True)

    def predict(batch: dict[str, torch.Tensor]) -> np.ndarray:
        with torch.inference_mode():
            return model(**batch).logits.float().numpy()

    return predict


def measure(args: argparse.Namespace, _workdir: Path) -> dict[str, Any]:
    """Worker for one run: load the exported model, warm up, time batch 32 and batch 1, score the dev set."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    directory = Path(args.export_dir) / MODEL_FILES[args.worker][0]
    texts, labels = dev_set(args.dev_file)
    tokenizer = AutoTokenizer.from_pretrained(directory)

    def encode(chunk: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(chunk, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"))

    batches = [encode(texts[i : i + args.batch_size]) for i in range(0, len(texts), args.batch_size)]
    singles = [encode([text]) for text in texts]
    start = time.perf_counter()
    predict = predictor(args.worker, directory)
    for batch in (*batches[:3], *singles[:3]):  # compiles (batch-1 shapes specialise once) and warms caches
        predict(batch)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    logits = np.concatenate([predict(batch) for batch in batches])
    batched = time.perf_counter() - start
    start = time.perf_counter()
    for batch in singles:
        predict(batch)
    single = time.perf_counter() - start
    files = MODEL_FILES[args.worker][1]
    return {
        "sentences_per_s": len(texts) / batched,
        "sentences_per_s_batch1": len(texts) / single,
        "accuracy": float((logits.argmax(-1) == np.array(labels)).mean()),
        "bytes_on_disk": sum((directory / name).stat().st_size for name in files),
        "warmup_s": warmup,
    }


def main() -> None:
    parser = base_parser(__doc__, "sst2", (*RUNS, "fit"), seeds=[42])
    parser.set_defaults(runs=list(RUNS))
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--export-dir", help=argparse.SUPPRESS)
    parser.add_argument("--dev-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "fit":
        report(fit_and_export(args, Path(args.export_dir)))
        return
    if args.worker:
        report(measure(args, Path(args.export_dir)))
        return
    if not (args.data_dir / "train.tsv").is_file():
        sys.exit(f"error: --data-dir {args.data_dir}: no train.tsv there (expected the SST-2 layout of shared/data)")
    model = args.model or default_model()
    settings = {k: getattr(args, k) for k in ("train_rows", "batch_size", "max_length", "epochs", "lr")}
    with tempfile.TemporaryDirectory() as tmp:
        train_file, export_dir = Path(tmp) / "train.tsv", Path(tmp) / "export"
        sample_train_rows(args.data_dir, args.train_rows, 42, train_file)
        common = ["--model", model, "--dev-file", str(args.data_dir / "dev.tsv"), "--export-dir", str(export_dir),
                  "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
        print("fitting and exporting …", flush=True)
        fit = run_worker(__file__, "fit", args.seeds[0], [*common, "--train-file", str(train_file), "--epochs",
                                                         str(args.epochs), "--lr", str(args.lr)])
        results = {}
        for name in args.runs:
            print(f"running {name} …", flush=True)
            results[name] = run_worker(__file__, name, args.seeds[0], common)
    reference = results.get("fp32_merged")
    print(f"fit: {fit['train_seconds']:.0f} s, dev accuracy {100 * fit['dev_accuracy_lightning']:.2f}; "
          f"export: {fit['export_seconds']:.0f} s")
    header = (f"{'run':<22}{'sent/s b32':>11}{'vs fp32':>9}{'sent/s b1':>11}{'vs fp32':>9}{'accuracy':>10}"
              f"{'MB on disk':>12}{'peak RSS MB':>13}{'warm-up s':>11}")
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        ratio = (r["sentences_per_s"] / reference["sentences_per_s"]) if reference else float("nan")
        ratio1 = (r["sentences_per_s_batch1"] / reference["sentences_per_s_batch1"]) if reference else float("nan")
        print(f"{name:<22}{r['sentences_per_s']:>11.1f}{ratio:>8.2f}x{r['sentences_per_s_batch1']:>11.1f}"
              f"{ratio1:>8.2f}x{100 * r['accuracy']:>10.2f}{r['bytes_on_disk'] / 2**20:>12.1f}"
              f"{r['peak_rss_mb']:>13.0f}{r['warmup_s']:>11.1f}")
    write_json(args.json, results, {**settings, "model": model, "fit": fit})


if __name__ == "__main__":
    main()
