"""CPU scaling on the SST-2 setting: 1 process vs 2-process DDP, fp32 vs bf16-mixed, gradient checkpointing off/on.

    python benchmarks/scaling.py --json benchmarks/results/scaling.json

Setting: the classification benchmark's (packaged MiniLM, LoRA r=8 on query/value, 4,000 SST-2 training rows, batch
32 per process, max_length 64, 1 epoch, lr 5e-4, our default batching), through ``configs/trainer/ddp.yaml``'s
strategy for 2 processes (gloo). On 2 processes each takes 16 rows per step so the global batch stays 32.
Train samples/s = rows / wall time of ``Trainer.fit`` on rank 0; peak RSS is per process (the largest). Torch
threads: all cores for 1 process, cores / 2 per process under DDP, so both use the whole machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classification import add_sst2_arguments, lora_config, sst2_workers  # noqa: E402
from common import (  # noqa: E402
    QUIET,
    base_parser,
    report,
    run_worker_records,
    timed_fit,
    write_json,
)

#: run → (processes, precision, gradient checkpointing)
CONFIGURATIONS = {
    "1proc_fp32": (1, "32-true", False),
    "1proc_bf16": (1, "bf16-mixed", False),
    "1proc_fp32_ckpt": (1, "32-true", True),
    "1proc_bf16_ckpt": (1, "bf16-mixed", True),
    "2proc_ddp_fp32": (2, "32-true", False),
    "2proc_ddp_bf16": (2, "bf16-mixed", False),
    "2proc_ddp_fp32_ckpt": (2, "32-true", True),
    "2proc_ddp_bf16_ckpt": (2, "bf16-mixed", True),
}


def run_configuration(args: argparse.Namespace) -> None:
    from functools import partial

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_peft import BackboneConfig, ClassificationDataModule, SequenceClassifier, TrainingConfig

    processes, precision, checkpointing = CONFIGURATIONS[args.worker]
    torch.set_num_threads(max((os.cpu_count() or 2) // processes, 1))
    pl.seed_everything(args.seed, verbose=False)
    dm = ClassificationDataModule(
        tokenizer=args.model, train_file=args.train_file, text_column="sentence", max_length=args.max_length,
        batch_size=args.batch_size // processes, seed=args.seed,
    )
    model = SequenceClassifier(
        BackboneConfig(pretrained_model_name_or_path=args.model, gradient_checkpointing=checkpointing), lora_config(),
        labels=dm.labels, optimizer=partial(torch.optim.AdamW, weight_decay=0.01), training=TrainingConfig(lr=args.lr),
    )
    strategy = DDPStrategy(find_unused_parameters=False) if processes > 1 else "auto"
    quiet = {key: value for key, value in QUIET.items() if key != "devices"}
    seconds = timed_fit(model, dm, args.epochs, devices=processes, strategy=strategy, precision=precision,
                        limit_val_batches=0, **quiet)
    report({  # each process tokenises the whole split; the distributed sampler gives each its share
        "processes": processes, "precision": precision, "gradient_checkpointing": checkpointing,
        "rank": model.trainer.global_rank, "train_seconds": seconds,
        "train_samples_per_s": len(dm.datasets["train"]) * args.epochs / seconds,
    })


def combine(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's timing, the largest peak RSS of any process."""
    (rank0,) = [r for r in records if r["rank"] == 0]
    return {**rank0, "peak_rss_mb": max(r["peak_rss_mb"] for r in records)}


def main() -> None:
    parser = base_parser(__doc__, "sst2", tuple(CONFIGURATIONS), seeds=[42])
    add_sst2_arguments(parser)  # --batch-size is the global batch, split over the processes
    args = parser.parse_args()
    if args.worker:
        run_configuration(args)
        return
    with sst2_workers(args) as (model, worker_args):
        results = {}
        for name in args.runs:
            print(f"running {name} …", flush=True)
            results[name] = combine(run_worker_records(__file__, name, args.seeds[0], worker_args))
    base = results.get("1proc_fp32", {}).get("train_samples_per_s")
    print(f"{'configuration':<24}{'procs':>6}{'precision':>12}{'ckpt':>6}{'samples/s':>11}{'vs 1proc fp32':>15}"
          f"{'peak RSS MB/proc':>18}")
    for name, r in results.items():
        ratio = f"{r['train_samples_per_s'] / base:.2f}x" if base else "-"
        print(f"{name:<24}{r['processes']:>6}{r['precision']:>12}{'on' if r['gradient_checkpointing'] else 'off':>6}"
              f"{r['train_samples_per_s']:>11.1f}{ratio:>15}{r['peak_rss_mb']:>18.0f}")
    write_json(args.json, results, {"train_rows": args.train_rows, "batch_size": args.batch_size,
                                    "max_length": args.max_length, "epochs": args.epochs, "model": model})


if __name__ == "__main__":
    main()
