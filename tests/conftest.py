"""Shared fixtures: a tiny random-init BERT saved as a local "pretrained" directory, and toy data files."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MATRIX_START, MATRIX_END = "<!-- peft-matrix:start -->", "<!-- peft-matrix:end -->"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--peft-matrix", metavar="PATH", default=None,
        help="write the PEFT method x task table from tests/test_peft_methods.py as Markdown to PATH (a file with "
        f"{MATRIX_START} … {MATRIX_END} markers, such as README.md, gets the table between them)",
    )


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    import sys

    path, module = config.getoption("--peft-matrix"), sys.modules.get("tests.test_peft_methods")
    if not path or module is None or not module.MATRIX:
        return
    table = module.render_matrix()
    target = Path(path)
    text = target.read_text() if target.exists() else ""
    if MATRIX_START in text and MATRIX_END in text:
        head, rest = text.split(MATRIX_START, 1)
        table = f"{head}{MATRIX_START}\n{table}{MATRIX_END}{rest.split(MATRIX_END, 1)[1]}"
    target.write_text(table)
    terminalreporter.write_line(f"PEFT method x task table written to {target}")


POSITIVE = ["good", "great", "lovely", "superb", "fine", "nice"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "dull", "rude"]
FILLER = ["the", "food", "was", "service", "room", "film", "really", "very", "and", "staff", "quite", "movie"]


def toy_sentence(rng: random.Random, label: str) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(1, 8))]
    words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
    return " ".join(words)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with a WordPiece tokenizer trained on the toy vocabulary, saved like a hub model."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-bert")
    # A fixed WordPiece vocabulary (trainers order ties arbitrarily, which would change the model per run):
    # whole toy words, plus letters and continuation letters so any other word splits into sub-words.
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted(set(POSITIVE + NEGATIVE + FILLER)) + ["un", "##believ", "##ably"]
    vocab = specials + words + letters + ["##" + c for c in letters] + [".", ",", "!", "?", "'", '"']
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = BertTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A learnable sentiment task (a polar word decides the label): train/validation/test/predict csv files."""
    directory = tmp_path_factory.mktemp("toy-data")
    rng = random.Random(0)
    files = {}
    for split, n in (("train", 320), ("validation", 64), ("test", 64)):
        rows = []
        for i in range(n):
            label = "pos" if i % 2 == 0 else "neg"
            rows.append([toy_sentence(rng, label), label])
        files[split] = write_csv(directory / f"{split}.csv", ["text", "label"], rows)
    files["predict"] = write_csv(
        directory / "predict.csv", ["text"], [["the food was great"], ["the room was awful"], ["good"]]
    )
    return files


@pytest.fixture(scope="session")
def fitted(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, toy_data: dict[str, Path]) -> dict[str, Path]:
    """One epoch of the CLI test config (tests/test_cli.py) fitted once: its config file and checkpoint directory;
    tests only read them."""
    from lightning_peft.cli import main
    from tests.test_cli import write_config

    directory = tmp_path_factory.mktemp("fitted")
    config = write_config(directory, tiny_bert_dir, toy_data)
    main(["fit", "--config", str(config), "--trainer.max_epochs", "1"])
    return {"config": config, "ckpt": directory / "ckpt"}


@pytest.fixture
def backbone(tiny_bert_dir: Path):
    from lightning_peft import BackboneConfig

    return BackboneConfig(pretrained_model_name_or_path=str(tiny_bert_dir))


@pytest.fixture
def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])


PEOPLE = [["john"], ["mary"], ["anna", "smith"], ["bob"]]
PLACES = [["paris"], ["london"], ["new", "york"], ["rome"]]


def toy_ner_sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    words, tags = [], []
    for _ in range(rng.randint(1, 3)):
        filler = [rng.choice(FILLER) for _ in range(rng.randint(0, 3))]
        words += filler
        tags += ["O"] * len(filler)
        entity, entity_type = (rng.choice(PEOPLE), "PER") if rng.random() < 0.5 else (rng.choice(PLACES), "LOC")
        words += entity
        tags += [f"B-{entity_type}"] + [f"I-{entity_type}"] * (len(entity) - 1)
    return words, tags


def write_conll(path: Path, sentences: list[tuple[list[str], list[str]]]) -> Path:
    lines = ["", "-DOCSTART- -X- -X- O", ""]
    for words, tags in sentences:
        lines += [f"{w} NN B-NP {t}" for w, t in zip(words, tags, strict=True)] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def toy_ner(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """CoNLL-2003-style files (4 columns, DOCSTART lines) of a learnable NER task: names and places."""
    directory = tmp_path_factory.mktemp("toy-ner")
    rng = random.Random(0)
    files = {
        split: write_conll(directory / f"{split}.txt", [toy_ner_sentence(rng) for _ in range(n)])
        for split, n in (("train", 240), ("validation", 48), ("test", 48))
    }
    predict = [toy_ner_sentence(rng)[0] for _ in range(3)]
    files["predict"] = directory / "predict.jsonl"
    files["predict"].write_text("\n".join(json.dumps({"tokens": words}) for words in predict) + "\n")
    return files


# -- seq2seq ------------------------------------------------------------------------------------------------
#: a toy "translation": each word maps to another toy word, so a tiny model can learn it in a few dozen steps
TOY_DICTIONARY = dict(zip(POSITIVE + NEGATIVE + FILLER, NEGATIVE + POSITIVE + FILLER[::-1], strict=True))


def toy_pair(rng: random.Random) -> dict[str, str]:
    words = [rng.choice(sorted(TOY_DICTIONARY)) for _ in range(rng.randint(2, 7))]
    return {"source": " ".join(words), "target": " ".join(TOY_DICTIONARY[w] for w in words) + "."}


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def toy_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """jsonl ``source``/``target`` pairs of the toy translation: train/validation/test, and predict sources."""
    directory = tmp_path_factory.mktemp("toy-pairs")
    rng = random.Random(0)
    files = {
        split: write_jsonl(directory / f"{split}.jsonl", [toy_pair(rng) for _ in range(n)])
        for split, n in (("train", 192), ("validation", 32), ("test", 32))
    }
    sources = ["good", "the food was really very bad", "nice"]
    files["predict"] = write_jsonl(directory / "predict.jsonl", [{"source": s} for s in sources])
    return files


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """A random-init T5 (2 layers, width 32) with a T5-style tokenizer over the toy words (``</s>`` ends every
    text, ``<pad>`` starts decoding), saved like a hub model."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    directory = tmp_path_factory.mktemp("tiny-t5")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["<pad>", "</s>", "<unk>"] + sorted(TOY_DICTIONARY) + letters + [".", ",", ":"]
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    config = T5Config(
        vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory


# -- decoder-only chat models ------------------------------------------------------------------------------
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def toy_conversation(rng: random.Random) -> dict[str, object]:
    """A user asks for the toy translation of a few words; the assistant answers it (learnable by a tiny model)."""
    pair = toy_pair(rng)
    return {"messages": [{"role": "user", "content": f"translate: {pair['source']}"},
                         {"role": "assistant", "content": pair["target"]}]}


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer over the toy words with ChatML special tokens and chat template (``<|im_end|>`` ends
    turns and sequences, ``<pad>`` pads)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("chat-tokenizer")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    words = ["system", "user", "assistant", "translate", "you", "are", "helpful"] + sorted(TOY_DICTIONARY)
    vocab = specials + words + letters + [".", ",", ":", "!", "?"]
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<|im_end|>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return directory


def save_tiny_decoder(directory: Path, tokenizer_dir: Path, architecture: str) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": None}
    torch.manual_seed(0)
    if architecture == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **ids)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **ids)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, chat_tokenizer_dir: Path) -> Path:
    """A random-init 2-layer, 32-wide Llama (grouped-query attention, tied embeddings) with the chat tokenizer."""
    return save_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), chat_tokenizer_dir, "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, chat_tokenizer_dir: Path) -> Path:
    """A random-init 2-layer, 32-wide GPT-2 with the chat tokenizer."""
    return save_tiny_decoder(tmp_path_factory.mktemp("tiny-gpt2"), chat_tokenizer_dir, "gpt2")


@pytest.fixture(scope="session")
def toy_chat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """jsonl conversations of the toy translation: train/validation/test, and predict prompts (user turns only)."""
    directory = tmp_path_factory.mktemp("toy-chat")
    rng = random.Random(0)
    files = {
        split: write_jsonl(directory / f"{split}.jsonl", [toy_conversation(rng) for _ in range(n)])
        for split, n in (("train", 128), ("validation", 16), ("test", 16))
    }
    prompts = ["translate: good", "translate: the food was really very bad", "translate: nice"]
    files["predict"] = write_jsonl(directory / "predict.jsonl",
                                   [{"messages": [{"role": "user", "content": p}]} for p in prompts])
    return files
