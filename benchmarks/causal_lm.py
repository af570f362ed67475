"""Dolly-15k instruction tuning of SmolLM2-135M-Instruct: lightning-peft vs TRL's ``SFTTrainer`` + ``peft``.

    python benchmarks/causal_lm.py --data-dir ../shared/data/dolly15k --json benchmarks/results/causal_lm.json

Setting: the packaged SmolLM2-135M-Instruct (``models/SmolLM2-135M-Instruct``, converted by ``make install``), LoRA
r=8 (alpha 16, dropout 0.05) on q_proj/v_proj, the first ``--train-conversations`` (128) training conversations,
1 epoch, batch 8, max length 512, AdamW lr 2e-4 with linear decay, gradient norm clipped at 1.0, loss on the
assistant tokens, bf16 autocast and activation checkpointing (TRL's defaults, and ours for decoders and the
shipped config), seed 42. Each run is a fresh subprocess.

Runs: ``lightning_peft`` (``CausalGenerator`` + ``ChatDataModule`` with their defaults: packed rows by position ids,
the LM head on labelled positions only), and TRL's ``SFTTrainer`` on prompt/completion rows (loss on the
completion, its default for such rows): ``trl_padding`` (its defaults: padded batches), ``trl_padding_free``
(``padding_free=True``; TRL then refuses ``max_length``, so its rows are not cut at 512) and ``trl_packing``
(``packing=True``, best-fit-decreasing packing).

Measured: real training tokens per second (non-padding tokens of the training rows, each system counting its own
tokenisation, over the wall time of ``fit`` / ``train``), peak RSS of the run's process, and the mean negative
log-likelihood of the assistant tokens of the first ``--test-conversations`` (100) test conversations, computed by
:func:`assistant_nll` — one function, the same tokenisation and masks, for every system's trained model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUIET, REPO, base_parser, report, run_all, summarise, write_json  # noqa: E402

RUNS = ("lightning_peft", "trl_padding", "trl_padding_free", "trl_packing")
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct"
TARGETS = ["q_proj", "v_proj"]
PRECISION = "bf16-mixed"  # TRL's default (bf16=True) and the shipped config's; bf16 autocast on CPU too


def read_conversations(path: Path, limit: int) -> list[list[dict[str, str]]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row["messages"] for row in rows[:limit]]


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")


@torch.no_grad()
def assistant_nll(model: torch.nn.Module, tokenizer: Any, conversations: list[list[dict[str, str]]],
                  max_length: int, batch_size: int = 8) -> float:
    """Mean negative log-likelihood per assistant token (end-of-turn token included) of ``conversations``, cut at
    ``max_length``: the test score of every run."""
    from lightning_peft.data.chat import ChatTemplate

    template = ChatTemplate(tokenizer)
    encoded = [template.encode(messages) for messages in conversations]
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = [(ids[:max_length], trained[:max_length]) for ids, trained in encoded[start:start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in chunk])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk])
        trained = torch.tensor([t + [False] * (width - len(t)) for _, t in chunk])
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
        targets, scored = input_ids[:, 1:], trained[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[scored], targets[scored], reduction="sum")
        total, count = total + float(losses), count + int(scored.sum())
    return total / count


def run_lightning_peft(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_peft import BackboneConfig, CausalGenerator, ChatDataModule, TrainingConfig

    pl.seed_everything(args.seed)
    dm = ChatDataModule(tokenizer=args.model, train_file=str(args.data_dir / "train.jsonl"),
                        limit_train_samples=args.train_conversations, max_length=args.max_length,
                        batch_size=args.batch_size)
    model = CausalGenerator(BackboneConfig(args.model), lora_config(), val_generation_batches=0,
                            training=TrainingConfig(lr=args.lr))
    dm.setup("fit")
    tokens = sum(len(ids) for ids in dm.datasets["train"]["input_ids"])
    trainer = pl.Trainer(max_epochs=1, enable_checkpointing=False, gradient_clip_val=1.0, precision=PRECISION, **QUIET)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    return record(args, model.model, dm.tokenizer, tokens, seconds)


def run_trl(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(args.seed)
    conversations = read_conversations(args.data_dir / "train.jsonl", args.train_conversations)
    rows = Dataset.from_dict({"prompt": [m[:-1] for m in conversations], "completion": [m[-1:] for m in conversations]})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    config = SFTConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=args.lr, lr_scheduler_type="linear", seed=args.seed,
        # TRL refuses max_length with padding-free batches unless packing cuts them: those rows stay whole
        max_length=None if args.worker == "trl_padding_free" else args.max_length,
        padding_free=args.worker == "trl_padding_free", packing=args.worker == "trl_packing",
        save_strategy="no", eval_strategy="no", logging_steps=50, report_to="none", disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer,
                         peft_config=lora_config())
    dataset = trainer.train_dataset
    tokens = sum(sum(row) for row in dataset["seq_lengths"]) if "seq_lengths" in dataset.column_names else sum(
        len(ids) for ids in dataset["input_ids"])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return record(args, trainer.model, tokenizer, tokens, seconds)


def record(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any, tokens: int, seconds: float
           ) -> dict[str, Any]:
    test = read_conversations(args.data_dir / "test.jsonl", args.test_conversations)
    return {"train_tokens": tokens, "train_seconds": seconds, "train_tokens_per_s": tokens / seconds,
            "test_assistant_nll": assistant_nll(model, tokenizer, test, args.max_length)}


def main() -> None:
    parser = base_parser(__doc__, "dolly15k", RUNS, seeds=[42])
    parser.add_argument("--train-conversations", type=int, default=128)
    parser.add_argument("--test-conversations", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    args = parser.parse_args()
    args.model = args.model or str(DEFAULT_MODEL)
    if args.worker:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            run = run_lightning_peft if args.worker == "lightning_peft" else run_trl
            report(run(args, Path(tmp)))
        return
    if not Path(args.model).is_dir():
        sys.exit(f"error: --model {args.model!r} is not a model directory; run `make install` to convert SmolLM2")
    worker_args = ["--data-dir", str(args.data_dir), "--model", args.model, "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--lr", str(args.lr),
                   "--train-conversations", str(args.train_conversations),
                   "--test-conversations", str(args.test_conversations)]
    per_seed = run_all(__file__, args.runs, args.seeds, worker_args)
    results = {name: summarise(records, "test_assistant_nll") for name, records in per_seed.items()}
    baseline = results.get("trl_padding")
    print(f"{'run':<20}{'tokens/s':>10}{'vs trl_padding':>16}{'test NLL':>10}{'peak RSS MB':>13}")
    for name, r in results.items():
        ratio = f"{r['train_tokens_per_s'] / baseline['train_tokens_per_s']:.2f}x" if baseline else "-"
        print(f"{name:<20}{r['train_tokens_per_s']:>10.1f}{ratio:>16}{r['test_assistant_nll']:>10.4f}"
              f"{r['peak_rss_mb']:>13.0f}")
    settings = {"model": args.model, "training_rows": f"first {args.train_conversations} of train.jsonl",
                "test_rows": f"first {args.test_conversations} of test.jsonl", "epochs": 1,
                "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr, "seeds": args.seeds,
                "peft": f"LoRA r=8 alpha=16 dropout=0.05 on {TARGETS}", "loss": "assistant tokens",
                "precision": PRECISION, "activation_checkpointing": True}
    write_json(args.json, results, settings)


if __name__ == "__main__":
    main()
