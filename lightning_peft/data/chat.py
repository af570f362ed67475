"""``ChatDataModule``: conversations, instruction rows or plain text, rendered with a chat template for a decoder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from lightning_peft.data.base import TextDataModule, is_blank
from lightning_peft.errors import LightningPeftError
from lightning_peft.types import IGNORE_INDEX

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


def check_conversation(messages: Any, where: str, needs_assistant: bool) -> list[Message]:
    """``messages`` as a list of ``{role, content}`` turns, or one :class:`LightningPeftError` naming the turn and
    field (``where``: the split's file and row)."""
    if not isinstance(messages, list) or not messages:
        raise LightningPeftError(f"{where}: messages must be a non-empty list of {{role, content}} turns, "
                                 f"got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise LightningPeftError(f"{where}: messages[{i}] must be a {{role, content}} object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise LightningPeftError(f"{where}: messages[{i}].role {role!r} is not one of {', '.join(ROLES)}; "
                                     "fix the row or remove it")
        if content is not None and not isinstance(content, str):
            parts = " (join its text parts into one string)" if isinstance(content, list) else ""
            raise LightningPeftError(f"{where}: messages[{i}].content must be text, got {type(content).__name__} "
                                     f"({content!r}){parts}")
        if is_blank(content):
            raise LightningPeftError(f"{where}: messages[{i}].content is empty ({content!r}); fill it in or remove "
                                     "the turn")
    if needs_assistant and not any(m["role"] == "assistant" for m in messages):
        raise LightningPeftError(f"{where}: no assistant turn to learn from (roles: "
                                 f"{', '.join(m['role'] for m in messages)}); add one or remove the row")
    if not any(m["role"] == "user" for m in messages):
        raise LightningPeftError(f"{where}: no user turn (roles: {', '.join(m['role'] for m in messages)})")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class ChatTemplate:
    """Renders conversations with a tokenizer's chat template and finds the tokens of each assistant turn.

    A turn's tokens are found by rendering: the text of ``messages[:i]`` with the generation prompt ends where
    assistant turn ``i`` begins, the text of ``messages[:i + 1]`` where it ends (end-of-turn token included), and
    the tokens whose characters fall in between are the turn's. This works for any template that renders a
    conversation's beginning the same whatever follows, which is checked.

    Example::

        template = ChatTemplate(tokenizer)
        ids, trained = template.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> None:
        if not tokenizer.is_fast:
            raise LightningPeftError("data.tokenizer: a fast tokenizer (tokenizer.json) is needed to find the "
                                     "assistant tokens of a conversation")
        if template is None and not tokenizer.chat_template:
            raise LightningPeftError(
                "data.chat_template: the tokenizer has no chat template and none is given; set data.chat_template "
                "(a Jinja template, e.g. the model family's), or use format: text"
            )
        self.tokenizer = tokenizer
        self.template = template

    def render(self, messages: list[Message], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def encode(self, messages: list[Message]) -> tuple[list[int], list[bool]]:
        """Token ids of the whole conversation and, per token, whether it belongs to an assistant turn."""
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start, end = self.render(messages[:i], generation_prompt=True), self.render(messages[: i + 1])
            if not (end.startswith(start) and text.startswith(end)):
                raise LightningPeftError(
                    "data.chat_template: the template renders the start of a conversation differently depending on "
                    "what follows, so assistant turns cannot be located; give a template that renders incrementally "
                    "(data.chat_template) or train on every token (data.assistant_only_loss: false)"
                )
            spans.append((len(start), len(end)))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        trained = [any(a <= first < b for a, b in spans) for first, _ in encoded["offset_mapping"]]
        return encoded["input_ids"], trained

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """Token ids of ``messages`` followed by the assistant's generation prompt."""
        return self.tokenizer(self.render(messages, generation_prompt=True), add_special_tokens=False)["input_ids"]


class ChatCollator:
    """Pads ``input_ids`` / ``labels`` on the right (for the loss) and ``prompt_input_ids`` on the left (for
    generation), each with its attention mask.

    Example::

        batch = ChatCollator(pad_token_id=0)([{"input_ids": [5, 6], "labels": [-100, 6]}])
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def _pad(self, rows: list[list[int]], value: int, side: str) -> torch.Tensor:
        return pad_sequence([torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True, padding_value=value,
                            padding_side=side)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key, side in (("input_ids", "right"), ("prompt_input_ids", "left")):
            if key in features[0]:
                rows = [f[key] for f in features]
                batch[key] = self._pad(rows, self.pad_token_id, side)
                mask_key = key.replace("input_ids", "attention_mask")
                batch[mask_key] = self._pad([[1] * len(r) for r in rows], 0, side)
        if "labels" in features[0]:
            batch["labels"] = self._pad([f["labels"] for f in features], IGNORE_INDEX, "right")
        return batch


class ChatDataModule(TextDataModule):
    """Data for a decoder-only model (:class:`~lightning_peft.CausalGenerator`): conversations, instruction rows, or
    plain text for continued pre-training.

    - ``format: messages``: a ``messages`` column of ``[{role, content}, …]`` turns (``system`` / ``user`` /
      ``assistant``, multi-turn), rendered with the tokenizer's chat template (or ``chat_template``);
    - ``format: instruction``: ``instruction`` / ``input`` / ``output`` columns (names settable), made into a user
      turn (instruction, then the input after a blank line) and an assistant turn;
    - ``format: text``: a ``text`` column, trained on every token, an end-of-sequence token appended.

    The loss covers assistant tokens only (their end-of-turn token included), or every token with
    ``assistant_only_loss: false``. Conversations longer than ``max_length`` are cut at the end and counted; one
    that loses all its assistant tokens is skipped and counted (it would give no loss). Validation and test rows
    also carry the prompt of their last assistant turn and that turn's text as the ``reference`` of the generation
    metrics; predict rows are prompts (a trailing assistant turn is left out) written back with their ``messages``.

    Args:
        format: ``messages``, ``instruction`` or ``text`` (see above).
        messages_column / text_column: the column of ``messages`` / ``text`` rows.
        instruction_column / input_column / output_column: the columns of ``instruction`` rows (``input`` may be
            missing or empty).
        chat_template: a Jinja chat template used instead of the tokenizer's (required when it has none).
        assistant_only_loss: train on assistant tokens only (default) or on every token.
        max_length: the longest training sequence in tokens (default 512); prompts are cut on the left to it.
        Other arguments: see :class:`~lightning_peft.data.base.TextDataModule`.

    Example::

        dm = ChatDataModule(tokenizer="models/SmolLM2-135M-Instruct", train_file="dolly15k/train.jsonl",
                            validation_file="dolly15k/validation.jsonl", max_length=512, batch_size=8)
    """

    passthrough_columns = ("messages", "text", "reference")
    count_columns = ("truncated", "skipped", "prompt_truncated")
    length_sorted_splits = ("validation", "test", "predict")

    def __init__(
        self,
        *args: Any,
        format: Literal["messages", "instruction", "text"] = "messages",  # noqa: A002 - the option's natural name
        messages_column: str = "messages",
        instruction_column: str = "instruction",
        input_column: str = "input",
        output_column: str = "output",
        text_column: str = "text",
        chat_template: str | None = None,
        assistant_only_loss: bool = True,
        max_length: int = 512,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, max_length=max_length, **kwargs)
        if format not in ("messages", "instruction", "text"):
            raise LightningPeftError(f"data.format: {format!r} is not one of messages, instruction, text")
        self.format = format
        self.messages_column = messages_column
        self.instruction_column = instruction_column
        self.input_column = input_column
        self.output_column = output_column
        self.text_column = text_column
        self.chat_template = chat_template
        self.assistant_only_loss = assistant_only_loss

    # -- TextDataModule hooks ---------------------------------------------------------------------------
    def required_columns(self, split: str) -> list[str]:
        if self.format == "messages":
            return [self.messages_column]
        if self.format == "text":
            return [self.text_column]
        return [self.instruction_column] + ([self.output_column] if self.has_labels(split) else [])

    @property
    def template(self) -> ChatTemplate:
        return ChatTemplate(self.tokenizer, self.chat_template)

    def pad_token_id(self) -> int:
        """The tokenizer's padding id, else its end-of-sequence id (decoders often define no padding token)."""
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        if pad is None:
            raise LightningPeftError("data.tokenizer: defines neither a padding nor an end-of-sequence token")
        return pad

    def conversations(self, rows: dict[str, list[Any]], split: str) -> list[list[Message]]:
        """The checked conversations of ``rows`` (a whole split is checked first, so row numbers name its rows)."""
        needs_assistant = self.has_labels(split)
        if self.format == "messages":
            values = rows[self.messages_column]
        else:
            values = []
            for i, instruction in enumerate(rows[self.instruction_column]):
                context = rows[self.input_column][i] if self.input_column in rows else None
                user = instruction if is_blank(context) else f"{instruction}\n\n{context}"
                turns = [{"role": "user", "content": user}]
                if needs_assistant:
                    turns.append({"role": "assistant", "content": rows[self.output_column][i]})
                values.append(turns)
        return [check_conversation(m, f"{self.describe(split)} row {i}", needs_assistant)
                for i, m in enumerate(values)]

    def prepare_split(self, dataset: Dataset, split: str) -> Dataset:
        if self.format == "text":
            self.check_filled(dataset, split, self.text_column, "text")
        else:
            self.template  # noqa: B018 - a missing chat template is reported before tokenising
            self.conversations(dataset[:], split)
        return dataset

    def preprocess(self, examples: dict[str, list[Any]], split: str) -> dict[str, list[Any]]:
        if self.format == "text":
            return self._preprocess_text(examples, split)
        template = self.template
        encoded: dict[str, list[Any]] = {key: [] for key in ("input_ids", *self.count_columns)}
        if split != "predict":
            encoded["labels"] = []
        if split != "train":
            encoded["prompt_input_ids"] = []
        if split in ("validation", "test"):
            encoded["reference"] = []
        if split == "predict":
            encoded["messages"] = []
        for messages in self.conversations(examples, split):
            if split == "predict":
                prompt = self._prompt_messages(messages, split)
                encoded["messages"].append(prompt)
                self._add_predict_row(encoded, template.prompt_ids(prompt))
                continue
            if split == "train":
                encoded["prompt_truncated"].append(0)
            else:
                prompt = self._prompt_messages(messages, split)
                self._add_prompt(encoded, template.prompt_ids(prompt))
            ids, trained = template.encode(messages)
            self._add_trained_row(encoded, ids, trained if self.assistant_only_loss else [True] * len(ids))
            if split != "train":
                encoded["reference"].append(messages[len(prompt)]["content"])
        return encoded

    @staticmethod
    def _prompt_messages(messages: list[Message], split: str) -> list[Message]:
        """What the model is prompted with: in evaluation the turns before the last assistant turn (whose text is
        the reference), in predict the conversation without a trailing assistant turn."""
        if split == "predict":
            return messages[:-1] if messages[-1]["role"] == "assistant" else messages
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last]

    def _preprocess_text(self, examples: dict[str, list[Any]], split: str) -> dict[str, list[Any]]:
        tokenizer = self.tokenizer
        texts = examples[self.text_column]
        encoded: dict[str, list[Any]] = {key: [] for key in ("input_ids", *self.count_columns)}
        if split == "predict":
            encoded["prompt_input_ids"] = []
            for ids in tokenizer(texts)["input_ids"]:
                self._add_predict_row(encoded, ids)
            return encoded
        encoded["labels"] = []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for ids in tokenizer(texts)["input_ids"]:
            self._add_trained_row(encoded, ids + eos, [True] * (len(ids) + len(eos)))
            encoded["prompt_truncated"].append(0)
        return encoded

    def _add_prompt(self, encoded: dict[str, list[Any]], ids: list[int]) -> None:
        """Append a generation prompt, cut on the left to ``max_length`` (and counted when cut)."""
        encoded["prompt_truncated"].append(int(len(ids) > self.max_length))
        encoded["prompt_input_ids"].append(ids[-self.max_length:])

    def _add_predict_row(self, encoded: dict[str, list[Any]], ids: list[int]) -> None:
        """Append a predict row: its prompt, also as ``input_ids`` (what the split is length-sorted by)."""
        self._add_prompt(encoded, ids)
        encoded["input_ids"].append(encoded["prompt_input_ids"][-1])
        encoded["truncated"].append(0)
        encoded["skipped"].append(0)

    def _add_trained_row(self, encoded: dict[str, list[Any]], ids: list[int], trained: list[bool]) -> None:
        """Append one training sequence cut to ``max_length``; a row left with no trained token is kept empty (and
        counted as skipped), to be dropped by :meth:`finish_split`."""
        encoded["truncated"].append(int(len(ids) > self.max_length))
        ids, trained = ids[: self.max_length], trained[: self.max_length]
        skipped = not any(trained[1:])  # the first token is never predicted
        encoded["skipped"].append(int(skipped))
        encoded["input_ids"].append([] if skipped else ids)
        encoded["labels"].append([] if skipped else [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained,
                                                                                                    strict=True)])

    def finish_split(self, dataset: Dataset, split: str) -> Dataset:
        """Drop the rows that :meth:`preprocess` left empty (every assistant token cut by ``max_length``)."""
        if split == "predict":
            return dataset
        return dataset.filter(lambda ids: len(ids) > 0, input_columns="input_ids", desc=f"Dropping empty {split} rows")

    def report_counts(self, split: str, counts: dict[str, list[int]]) -> None:
        total = len(counts["truncated"])
        truncated, skipped, prompts = (sum(counts[c]) for c in ("truncated", "skipped", "prompt_truncated"))
        what = "texts" if self.format == "text" else "conversations"
        if truncated:
            rank_zero_warn(
                f"{split}: {truncated} of {total} {what} are longer than max_length={self.max_length} tokens and were "
                f"cut at the end" + (f"; {skipped} of them lost every trained token and were skipped" if skipped
                                     else "") + " (raise data.max_length)"
            )
        if prompts:
            rank_zero_warn(f"{split}: {prompts} of {total} prompts are longer than max_length={self.max_length} "
                           "tokens and were cut on the left (raise data.max_length)")

    def build_collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return ChatCollator(self.pad_token_id())

    def card_facts(self) -> dict[str, Any]:
        loss = "assistant tokens" if self.assistant_only_loss and self.format != "text" else "every token"
        return {**super().card_facts(), "format": self.format, "loss on": loss}
