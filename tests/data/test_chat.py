from __future__ import annotations

import json

import pytest
import torch

from lightning_peft import ChatDataModule, LightningPeftError
from lightning_peft.data.chat import ChatCollator
from lightning_peft.types import IGNORE_INDEX
from tests.conftest import write_jsonl

CONVERSATION = [
    {"role": "system", "content": "you are helpful"},
    {"role": "user", "content": "translate: good food"},
    {"role": "assistant", "content": "bad food."},
    {"role": "user", "content": "translate: nice"},
    {"role": "assistant", "content": "rude."},
]


def chat(tokenizer_dir, files, **kwargs) -> ChatDataModule:
    return ChatDataModule(tokenizer=str(tokenizer_dir), **{f"{split}_file": str(path) for split, path in files.items()},
                          batch_size=4, seed=0, **kwargs)


def trained_text(dm: ChatDataModule, row: dict) -> list[str]:
    return [dm.tokenizer.convert_ids_to_tokens(t) for t in row["labels"] if t != IGNORE_INDEX]


def test_loss_covers_every_assistant_turn_and_its_end_token_only(chat_tokenizer_dir, tmp_path):
    dm = chat(chat_tokenizer_dir, {"train": write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])})
    dm.setup("fit")
    row = dm.datasets["train"][0]
    assert trained_text(dm, row) == ["bad", "food", ".", "<|im_end|>", "rude", ".", "<|im_end|>"]
    assert dm.tokenizer.decode(row["input_ids"]).startswith("<|im_start|> system you are helpful <|im_end|>")

    everything = chat(chat_tokenizer_dir, {"train": tmp_path / "train.jsonl"}, assistant_only_loss=False)
    everything.setup("fit")
    assert everything.datasets["train"][0]["labels"] == row["input_ids"]


def test_instruction_rows_become_a_user_and_an_assistant_turn(chat_tokenizer_dir, tmp_path):
    rows = [{"task": "translate: good", "context": "food", "answer": "bad food."},
            {"task": "translate: nice", "context": None, "answer": "rude."}]
    dm = chat(chat_tokenizer_dir, {"train": write_jsonl(tmp_path / "train.jsonl", rows)}, format="instruction",
              instruction_column="task", input_column="context", output_column="answer")
    dm.setup("fit")
    conversation = [{"role": "user", "content": "translate: good\n\nfood"},
                    {"role": "assistant", "content": "bad food."}]
    expected = dm.tokenizer.apply_chat_template(conversation, tokenize=False)
    assert dm.tokenizer.decode(dm.datasets["train"][0]["input_ids"]) == dm.tokenizer.decode(
        dm.tokenizer(expected, add_special_tokens=False)["input_ids"])
    assert trained_text(dm, dm.datasets["train"][1]) == ["rude", ".", "<|im_end|>"]


def test_plain_text_trains_on_every_token_and_ends_with_eos(chat_tokenizer_dir, tmp_path):
    dm = chat(chat_tokenizer_dir, {"train": write_jsonl(tmp_path / "train.jsonl", [{"text": "good food"}])},
              format="text")
    dm.setup("fit")
    row = dm.datasets["train"][0]
    assert row["labels"] == row["input_ids"]
    assert dm.tokenizer.convert_ids_to_tokens(row["input_ids"]) == ["good", "food", "<|im_end|>"]


def test_truncation_is_counted_and_rows_without_assistant_tokens_are_skipped(chat_tokenizer_dir, tmp_path):
    long_prompt = "translate: " + " ".join(["good"] * 30)
    rows = [{"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "bad."}]},
            {"messages": [{"role": "user", "content": "translate: good"},
                          {"role": "assistant", "content": " ".join(["bad"] * 30)}]},
            {"messages": CONVERSATION[1:3]}]
    dm = chat(chat_tokenizer_dir, {"train": write_jsonl(tmp_path / "train.jsonl", rows)}, max_length=16)
    with pytest.warns(UserWarning, match=r"train: 2 of 3 conversations are longer than max_length=16 tokens and were "
                      r"cut at the end; 1 of them lost every trained token and were skipped"):
        dm.setup("fit")
    kept = dm.datasets["train"]
    assert len(kept) == 2 and all(len(ids) <= 16 for ids in kept["input_ids"])
    batch = next(iter(dm.train_dataloader()))
    assert bool((batch["labels"] != IGNORE_INDEX).any(1).all())  # every row has a token to learn: no NaN loss


def test_evaluation_rows_carry_the_last_turns_prompt_and_reference(chat_tokenizer_dir, tmp_path):
    files = {"test": write_jsonl(tmp_path / "test.jsonl", [{"messages": CONVERSATION}]),
             "predict": write_jsonl(tmp_path / "predict.jsonl", [{"messages": CONVERSATION[:4]}] * 3)}
    dm = chat(chat_tokenizer_dir, files, limit_predict_samples=1)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["reference"] == ["rude."]
    prompt = dm.tokenizer.decode(batch["prompt_input_ids"][0])
    assert prompt.endswith("translate : nice <|im_end|> <|im_start|> assistant") and "rude" not in prompt
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["messages"] == [CONVERSATION[:4]]


def test_collator_pads_labels_right_and_prompts_left():
    batch = ChatCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "prompt_input_ids": [5]},
        {"input_ids": [8], "labels": [8], "prompt_input_ids": [8, 9]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["prompt_input_ids"].tolist() == [[0, 5], [8, 9]]
    assert torch.equal(batch["prompt_attention_mask"], torch.tensor([[0, 1], [1, 1]]))


@pytest.mark.parametrize(("messages", "error"), [
    ([{"role": "user", "content": "hi"}], r"row 0: no assistant turn to learn from \(roles: user\)"),
    ([{"role": "bot", "content": "hi"}], r"row 0: messages\[0\].role 'bot' is not one of system, user, assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
     r"row 0: messages\[1\].content is empty"),
    ("hello", "row 0: messages must be a non-empty list"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "hello"}],
     r"row 0: messages\[0\].content must be text, got list \(.*\) \(join its text parts into one string\)"),
    ([{"role": "user", "content": 5}, {"role": "assistant", "content": "hello"}],
     r"row 0: messages\[0\].content must be text, got int \(5\)$"),
])
def test_bad_conversations_name_the_row_and_field(chat_tokenizer_dir, tmp_path, messages, error):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(LightningPeftError, match=f"train_file '{path}' {error}"):
        chat(chat_tokenizer_dir, {"train": path}).setup("fit")


def test_a_tokenizer_without_chat_template_needs_one_given(tiny_t5_dir, chat_tokenizer_dir, tmp_path):
    files = {"train": write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])}
    with pytest.raises(LightningPeftError, match="data.chat_template: the tokenizer has no chat template"):
        chat(tiny_t5_dir, files).setup("fit")
    from tests.conftest import CHATML

    dm = chat(tiny_t5_dir, files, chat_template=CHATML)  # the T5 tokenizer lacks <|im_start|>: words still encode
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 1


def test_plain_text_prompts_continue_the_text(chat_tokenizer_dir, tmp_path):
    files = {"predict": write_jsonl(tmp_path / "predict.jsonl", [{"text": "good food"}, {"text": "bad"}])}
    dm = chat(chat_tokenizer_dir, files, format="text")
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["text"] == ["good food", "bad"]  # passed through for the predictions file
    assert batch["prompt_input_ids"].tolist() == [dm.tokenizer(["good food"])["input_ids"][0],
                                                  [dm.tokenizer.pad_token_id] + dm.tokenizer(["bad"])["input_ids"][0]]
