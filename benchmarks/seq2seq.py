"""Multi30k German→English benchmark: lightning-peft vs the HF ``Seq2SeqTrainer`` + ``peft`` recipe, BERT2BERT.

    python benchmarks/seq2seq.py --json benchmarks/results/seq2seq.json

Setting: an ``EncoderDecoderModel`` warm-started from the packaged MiniLM-L6 encoder on both sides; LoRA r=8
(alpha 16, dropout 0.1) on the self-attention query/value, the randomly initialised cross-attention and LM-head
transform trained in full (peft ``modules_to_save``); the first 4,000 training pairs, 2 epochs, batch 32, max
length 64 (source and target), AdamW lr 1e-3 (weight decay 0.01), linear decay, gradient norm clipped at 1.0
(the HF Trainer's default), seed 42. German sources, English
targets (the packaged tokenizer is English and uncased). Each run is a fresh subprocess.

Evaluation: greedy decoding (at most 64 new tokens) of the full test split (1,000 sentences), batch 32, decoded
with the tokenizer; BLEU and chrF by ``sacrebleu`` (corpus level, lower-cased) on those outputs, computed the same
way for every run. Train samples/s = pairs × epochs / wall time of ``fit`` / ``train``; generation sentences/s =
test sentences / wall time of ``predict`` (ours: length-sorted batches, written back in input order; HF:
``Seq2SeqTrainer.predict`` with ``predict_with_generate``, batches in file order).

Runs: ``lightning_peft`` (our defaults: window-2 length grouping, micro-batches of 16), ``lightning_peft_shuffled``
(shuffled batches as HF's default) and ``hf_trainer`` (the recipe of the transformers BERT2BERT examples: labels
are the tokenised targets with padding set to -100, ``DataCollatorForSeq2Seq`` builds the decoder inputs).
"""

from __future__ import annotations

import argparse
import json
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

RUNS = ("lightning_peft", "lightning_peft_shuffled", "hf_trainer")
GROUPED = {"lightning_peft": True, "lightning_peft_shuffled": False, "hf_trainer": False}
SELF_ATTENTION_QV = r".*\.attention\.self\.(query|value)"  # not the cross-attention, which is trained in full


def read_pairs(path: Path, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(German sources, English targets) of a Multi30k jsonl file (``source`` is English, ``target`` German)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    return [r["target"] for r in rows], [r["source"] for r in rows]


def scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    from sacrebleu.metrics import BLEU, CHRF

    return {
        "test_bleu": BLEU(lowercase=True).corpus_score(predictions, [references]).score,
        "test_chrf": CHRF(lowercase=True).corpus_score(predictions, [references]).score,
    }


def run_lightning_peft(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from functools import partial

    import lightning.pytorch as pl
    import torch
    from peft import LoraConfig

    from lightning_peft import (
        BackboneConfig,
        JsonlPredictionWriter,
        Seq2SeqDataModule,
        Seq2SeqGenerator,
        TrainingConfig,
    )

    pl.seed_everything(args.seed, verbose=False)
    test_file = args.test_file
    dm = Seq2SeqDataModule(
        tokenizer=args.model, train_file=args.train_file, predict_file=test_file,
        source_column="target", target_column="source", max_length=args.max_length,
        max_target_length=args.max_length, batch_size=args.batch_size, group_by_length=GROUPED[args.worker],
        seed=args.seed,
    )
    model = Seq2SeqGenerator(
        BackboneConfig(args.model, decoder_pretrained_model_name_or_path=args.model),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"]),
        generation={"max_new_tokens": args.max_length, "num_beams": 1},
        optimizer=partial(torch.optim.AdamW, weight_decay=0.01), training=TrainingConfig(lr=args.lr),
    )
    seconds = timed_fit(model, dm, args.epochs)
    output = workdir / "predictions.jsonl"
    dm.setup("predict")
    start = time.perf_counter()
    pl.Trainer(callbacks=[JsonlPredictionWriter(str(output))], **QUIET).predict(
        model, datamodule=dm, return_predictions=False
    )
    generation_seconds = time.perf_counter() - start
    predictions = [json.loads(line)["prediction"] for line in output.read_text(encoding="utf-8").splitlines()]
    _, references = read_pairs(Path(args.test_file))
    return {
        "train_seconds": seconds,
        "train_samples_per_s": len(dm.datasets["train"]) * args.epochs / seconds,
        "generation_sentences_per_s": len(predictions) / generation_seconds,
        **scores(predictions, references),
        "example": predictions[0],
    }


def run_hf_trainer(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithPadding,
        EncoderDecoderModel,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        set_seed,
    )

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(args.model, args.model)
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = tokenizer.cls_token_id
        config.eos_token_id = tokenizer.sep_token_id
        config.pad_token_id = tokenizer.pad_token_id
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, target_modules=SELF_ATTENTION_QV,
        modules_to_save=["crossattention", "cls.predictions.transform"], task_type=TaskType.SEQ_2_SEQ_LM,
    )
    model = get_peft_model(model, lora)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch["source"], truncation=True, max_length=args.max_length, return_token_type_ids=False)
        if "target" in batch:
            encoded["labels"] = tokenizer(text_target=batch["target"], truncation=True, max_length=args.max_length)[
                "input_ids"
            ]
        return encoded

    sources, targets = read_pairs(Path(args.train_file))
    train_set = Dataset.from_dict({"source": sources, "target": targets}).map(
        encode, batched=True, remove_columns=["source", "target"]
    )
    test_sources, references = read_pairs(Path(args.test_file))
    test_set = Dataset.from_dict({"source": test_sources}).map(encode, batched=True, remove_columns=["source"])
    training_args = hf_training_arguments(
        args, workdir, GROUPED[args.worker], Seq2SeqTrainingArguments,
        predict_with_generate=True, generation_max_length=None, generation_num_beams=1,
    )
    trainer = Seq2SeqTrainer(
        model=model, args=training_args, train_dataset=train_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    # DataCollatorForSeq2Seq puts labels=None into label-less batches, which Seq2SeqTrainer then feeds to the model
    trainer.data_collator = DataCollatorWithPadding(tokenizer)
    start = time.perf_counter()
    output = trainer.predict(test_set, max_new_tokens=args.max_length)
    generation_seconds = time.perf_counter() - start
    ids = output.predictions
    ids[ids == -100] = tokenizer.pad_token_id
    predictions = tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return {
        "train_seconds": seconds,
        "train_samples_per_s": len(train_set) * args.epochs / seconds,
        "generation_sentences_per_s": len(predictions) / generation_seconds,
        **scores(predictions, references),
        "example": predictions[0],
    }


def main() -> None:
    parser = base_parser(__doc__, "multi30k", RUNS, seeds=[42])
    parser.add_argument("--train-pairs", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--test-sentences", type=int, default=None, help="first N test pairs (default: all)")
    parser.add_argument("--test-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work(args, run_lightning_peft, run_hf_trainer)
        return

    if not (args.data_dir / "train.jsonl").is_file():
        sys.exit(f"error: --data-dir {args.data_dir}: no train.jsonl there (expected the Multi30k jsonl layout)")
    model = args.model or default_model()
    keys = ("train_pairs", "test_sentences", "batch_size", "max_length", "epochs", "lr", "seeds")
    settings = {k: getattr(args, k) for k in keys}
    with tempfile.TemporaryDirectory() as tmp:
        train_file, test_file = Path(tmp) / "train.jsonl", Path(tmp) / "test.jsonl"
        for split, out, limit in (("train", train_file, args.train_pairs), ("test", test_file, args.test_sentences)):
            lines = (args.data_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:limit]
            out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        worker_args = [
            "--model", model, "--train-file", str(train_file), "--test-file", str(test_file),
            *training_worker_args(args),
        ]
        per_seed = run_all(__file__, args.runs, args.seeds, worker_args)
    results = {name: summarise(records, "test_bleu") for name, records in per_seed.items()}
    gen_baseline = results.get("hf_trainer", {}).get("generation_sentences_per_s")

    def generation_ratio(r: dict[str, Any]) -> str:
        return f"{r['generation_sentences_per_s'] / gen_baseline:.2f}x" if gen_baseline else "-"

    print_table(
        results,
        baselines=("hf_trainer",),
        columns=[
            ("BLEU", 8, lambda r: f"{r['test_bleu']:.2f}"),
            ("chrF", 8, lambda r: f"{r['test_chrf']:.2f}"),
            ("gen sent/s", 12, lambda r: f"{r['generation_sentences_per_s']:.1f}"),
            ("gen vs HF", 11, generation_ratio),
            ("peak RSS MB", 13, lambda r: f"{r['peak_rss_mb']:.0f}"),
        ],
    )
    write_json(args.json, results, {**settings, "model": model})


if __name__ == "__main__":
    main()
