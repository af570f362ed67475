"""The server's models: one frozen base in memory, every served adapter on it, and batches that mix adapters.

Adapters whose heads have the same shape (task, PEFT method, number of labels) live in one ``PeftModel`` as named
adapters; a batch mixing them runs as one forward pass of the base, peft routing each row to its adapter
(``adapter_names``; LoRA and the methods peft can mix), or one pass per adapter for the others. Different head shapes
get their own ``PeftModel`` whose body *shares the parameters* of the first one, so the base weights are in memory
once.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)

from lightning_peft.compressed import OnnxModel
from lightning_peft.encoder_decoder import warm_start_encoder_decoder
from lightning_peft.errors import LightningPeftError
from lightning_peft.metrics.entities import sentence_record
from lightning_peft.serve.exports import AdapterRefused, ServedAdapter
from lightning_peft.serve.gathered_lora import GatheredLora
from lightning_peft.tasks.base import label_config
from lightning_peft.tasks.classification import label_records
from lightning_peft.tasks.token_classification import first_subtoken_tags
from lightning_peft.uncertainty import summarise_samples

AUTO_CLASSES = {"classification": AutoModelForSequenceClassification,
                "token_classification": AutoModelForTokenClassification,
                "seq2seq": AutoModelForSeq2SeqLM, "causal_lm": AutoModelForCausalLM}
#: threshold of a multi-label classifier's served labels (the task's default)
MULTI_LABEL_THRESHOLD = 0.5
#: PEFT methods whose adapters peft runs side by side in one batch (``adapter_names``)
MIXABLE_METHODS = ("LORA",)
#: fixed cost of one forward pass in padded tokens (MiniLM on 2 CPU cores: ~7 ms ≈ 55 tokens of compute)
PASS_COST_TOKENS = 64
#: input limit for models that state none
UNSTATED_MAX_LENGTH = 2048
#: longest generation a request may ask for
MAX_NEW_TOKENS_LIMIT = 1024


def length_buckets(lengths: Sequence[int], pass_cost: int = PASS_COST_TOKENS) -> list[list[int]]:
    """Split rows (their token counts) into forward passes that cost least: each pass computes its row count ×
    its longest row in padded tokens, plus ``pass_cost`` tokens' worth of fixed cost. Rows sorted by length, the
    best split points found by dynamic programming (in chunks of 256 rows for larger batches). Returns the row
    indices of each pass.

    Example::

        length_buckets([5, 60, 6, 58])  # [[0, 2], [3, 1]]: two passes instead of four rows padded to 60
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets = []
    for start in range(0, len(order), 256):
        chunk = order[start:start + 256]
        best = [0.0] + [float("inf")] * len(chunk)  # best[j]: cost of the first j rows
        split = [0] * (len(chunk) + 1)
        for j in range(1, len(chunk) + 1):
            longest = lengths[chunk[j - 1]]
            for i in range(j):
                cost = best[i] + (j - i) * longest + pass_cost
                if cost < best[j]:
                    best[j], split[j] = cost, i
        j, passes = len(chunk), []
        while j:
            passes.append(chunk[split[j]:j])
            j = split[j]
        buckets += reversed(passes)
    return buckets


class InputError(ValueError):
    """A request the engine cannot answer: ``status`` (HTTP), the ``field`` at fault and the message with the fix."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status


def unknown_adapter(field: str, name: Any, served: Sequence[str] | None = None) -> InputError:
    """The 404 for a request naming an adapter that is not served (listing the served ones when given)."""
    listing = f" ({', '.join(served) or 'none'})" if served is not None else ""
    return InputError(field, f"no adapter named {name!r} is served{listing}; GET /adapters lists them", 404)


@dataclass
class Row:
    """One input of one request: its adapter, token ids, what the response repeats of the input, and (for
    generation) its generation settings."""

    adapter: ServedAdapter
    input_ids: list[int]
    given: dict[str, Any]
    word_ids: list[int | None] = field(default_factory=list)
    generation: GenerationConfig | None = None


class AdapterEngine:
    """Load, unload and run exported adapters on one frozen base (one instance per server worker).

    Example::

        engine = AdapterEngine()
        engine.load(read_adapter("sentiment", "runs/quickstart/export"))
        engine.predict([("sentiment", ["great film"], {})])  # [[{'text': 'great film', 'label': 'positive', …}]]
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.adapters: dict[str, ServedAdapter] = {}
        self.models: dict[tuple[Any, ...], PeftModel] = {}
        self.tokenizers: dict[str, Any] = {}
        self.base: str | None = None
        self._body: dict[str, torch.nn.Parameter] = {}
        self._gathered: dict[tuple[Any, ...], GatheredLora | None] = {}  # stacked LoRA weights per model
        self._lock = threading.Lock()

    # -- the serving set --------------------------------------------------------------------------------
    def load(self, adapter: ServedAdapter) -> None:
        """Add ``adapter``; on any failure (:class:`AdapterRefused` naming the cause) the serving set is unchanged."""
        with self._lock:
            if adapter.name in self.adapters:
                raise AdapterRefused(f"name: an adapter named {adapter.name!r} is already served; unload it first "
                                     "or choose another name")
            if self.base is not None and adapter.base_identity != self.base and not adapter.standalone:
                raise AdapterRefused(f"path: {str(adapter.directory)!r} was trained on {adapter.base_identity!r} "
                                     f"but this server's base is {self.base!r}; adapters must share the base (serve "
                                     "it from another server)")
            try:
                tokenizer = AutoTokenizer.from_pretrained(adapter.directory)
            except (OSError, ValueError) as err:
                raise AdapterRefused(f"path: {str(adapter.directory)!r} holds no readable tokenizer ({err}); "
                                     "re-export the adapter") from err
            if adapter.standalone:
                self.models[adapter.head] = self._standalone_model(adapter)
                self.tokenizers[adapter.name] = tokenizer
                self.adapters[adapter.name] = adapter
                return
            model = self.models.get(adapter.head)
            try:
                if model is None:
                    model = PeftModel.from_pretrained(self._base_model(adapter, tokenizer), adapter.directory,
                                                      adapter_name=adapter.name, is_trainable=False)
                    model.to(self.device).eval()
                else:
                    model.load_adapter(adapter.directory, adapter_name=adapter.name, is_trainable=False)
                    model.to(self.device)
            except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
                if model is not None and adapter.name in model.peft_config:
                    model.delete_adapter(adapter.name)
                raise AdapterRefused(f"path: peft cannot load {str(adapter.directory)!r} onto {adapter.base!r} "
                                     f"({type(err).__name__}: {str(err)[:300]}); it does not fit this base") from err
            self.models[adapter.head] = model
            self._gathered.pop(adapter.head, None)
            self.tokenizers[adapter.name] = tokenizer
            self.adapters[adapter.name] = adapter
            self.base = adapter.base_identity

    def _standalone_model(self, adapter: ServedAdapter) -> torch.nn.Module:
        """A compressed export's own model: ``int8/`` through transformers (torchao), an ONNX file through
        onnxruntime."""
        try:
            if adapter.model_file is not None:
                return OnnxModel(adapter.directory, adapter.model_file)
            return AUTO_CLASSES[adapter.task].from_pretrained(adapter.directory).to(self.device).eval()
        except (OSError, ValueError, RuntimeError, ImportError, LightningPeftError) as err:
            raise AdapterRefused(f"path: cannot load the compressed export {str(adapter.directory)!r} "
                                 f"({type(err).__name__}: {str(err)[:300]})") from err

    def unload(self, name: str) -> ServedAdapter:
        """Remove the adapter ``name`` (and its model, when it was the last one on it)."""
        with self._lock:
            adapter = self.adapters.pop(name)
            self.tokenizers.pop(name)
            model = self.models[adapter.head]
            self._gathered.pop(adapter.head, None)
            if not adapter.standalone and any(other.head == adapter.head for other in self.adapters.values()):
                model.delete_adapter(name)
            else:
                del self.models[adapter.head]
            return adapter

    def _base_model(self, adapter: ServedAdapter, tokenizer: Any) -> PreTrainedModel:
        """A fresh base model for ``adapter``'s head whose body shares the parameters already in memory (an
        encoder-decoder warm-started as in training, when the adapter names a ``decoder``)."""
        kwargs: dict[str, Any] = {}
        if adapter.task in ("classification", "token_classification"):
            kwargs.update(label_config(list(adapter.labels)) if adapter.labels else {"num_labels": 1})
            if adapter.problem_type:
                kwargs["problem_type"] = adapter.problem_type
        try:
            if adapter.decoder is not None:
                model, _ = warm_start_encoder_decoder(adapter.base, adapter.decoder, tokenizer)
            else:
                model = AUTO_CLASSES[adapter.task].from_pretrained(adapter.base, **kwargs)
        except (OSError, ValueError, LightningPeftError) as err:
            raise AdapterRefused(f"path: the base model {adapter.base!r} named in {str(adapter.directory)!r} cannot "
                                 f"be loaded ({err}); make it available at that path or hub id") from err
        body = getattr(model, model.base_model_prefix, model)
        for name, parameter in list(body.named_parameters()):
            shared = self._body.setdefault(name, parameter)
            if shared is not parameter and shared.shape == parameter.shape:
                owner, _, attribute = name.rpartition(".")
                setattr(body.get_submodule(owner) if owner else body, attribute, shared)
        return model

    # -- requests ---------------------------------------------------------------------------------------
    def predict(self, requests: Sequence[tuple[str, list[Any], dict[str, Any]]]) -> list[list[dict] | InputError]:
        """Answer ``(adapter name, inputs, options)`` requests together: per request its records, or the
        :class:`InputError` that refused it (other requests are answered regardless)."""
        rows: list[Row] = []
        owners: list[int] = []
        answers: list[list[dict] | InputError] = [[] for _ in requests]
        with self._lock:
            for index, (name, inputs, options) in enumerate(requests):
                try:
                    encoded = self.encode(name, inputs, options)
                except InputError as err:
                    answers[index] = err
                    continue
                rows += encoded
                owners += [index] * len(encoded)
            for owner, record in zip(owners, self._run(rows), strict=True):
                answers[owner].append(record)
        return answers

    def encode(self, name: str, inputs: list[Any], options: dict[str, Any]) -> list[Row]:
        """Token ids of one request's inputs for its adapter; :class:`InputError` for unknown adapters, inputs of
        the wrong type and inputs longer than the model takes."""
        adapter = self.adapters.get(name)
        if adapter is None:
            raise unknown_adapter("adapter", name)
        tokenizer = self.tokenizers[name]
        generation = self._generation_config(adapter, options) if adapter.task in ("seq2seq", "causal_lm") else None
        limit = self.max_length(adapter)
        rows = []
        for i, value in enumerate(inputs):
            field = f"inputs[{i}]"
            if adapter.task == "token_classification":
                words = value.split() if isinstance(value, str) else value
                if not (isinstance(words, list) and words and all(isinstance(w, str) and w for w in words)):
                    raise InputError(field, "give a sentence as a string or a non-empty list of words")
                encoding = tokenizer(words, is_split_into_words=True)
                row = Row(adapter, encoding["input_ids"], {"words": words}, word_ids=encoding.word_ids())
            elif adapter.task == "causal_lm":
                row = Row(adapter, *self._prompt(tokenizer, value, field), generation=generation)
            elif isinstance(value, str) and value.strip():
                key = "source" if adapter.task == "seq2seq" else "text"
                row = Row(adapter, tokenizer(value)["input_ids"], {key: value}, generation=generation)
            elif adapter.task == "classification" and isinstance(value, list) and len(value) == 2 and all(
                    isinstance(v, str) and v.strip() for v in value):
                row = Row(adapter, tokenizer(*value)["input_ids"], {"text": value[0], "text_pair": value[1]})
            else:
                raise InputError(field, "give a non-empty string" + (
                    " (or a [text, text_pair] list)" if adapter.task == "classification" else ""))
            if len(row.input_ids) > limit:
                raise InputError(field, f"is {len(row.input_ids)} tokens long but the model takes at most {limit}; "
                                        "shorten it or split it", 413)
            rows.append(row)
        return rows

    @staticmethod
    def _prompt(tokenizer: Any, value: Any, field: str) -> tuple[list[int], dict[str, Any]]:
        """A decoder's prompt ids as ``ChatDataModule`` builds them for ``predict``: a conversation (or a string,
        as one user turn) rendered with the chat template and a generation prompt; plain text without a template."""
        if not tokenizer.chat_template:
            if not (isinstance(value, str) and value.strip()):
                raise InputError(field, "this adapter's tokenizer has no chat template: give a non-empty string")
            return tokenizer(value)["input_ids"], {"text": value}
        messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise InputError(field, "give a string or a list of {'role': …, 'content': …} messages")
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"], {"messages": messages}

    def max_length(self, adapter: ServedAdapter) -> int:
        """The longest input the adapter's base takes: its position embeddings or the tokenizer's limit (a model
        with relative positions, such as T5, states none: then :data:`UNSTATED_MAX_LENGTH`)."""
        config = self.models[adapter.head].config
        limits = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions")]
        limits.append(getattr(self.tokenizers[adapter.name], "model_max_length", None))
        return min((int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000_000),
                   default=UNSTATED_MAX_LENGTH)

    @staticmethod
    def _generation_config(adapter: ServedAdapter, options: dict[str, Any]) -> GenerationConfig:
        settings = dict(adapter.generation)
        if options.get("max_new_tokens") is not None:
            settings["max_new_tokens"] = options["max_new_tokens"]
        if options.get("temperature") is not None:
            temperature = options["temperature"]
            settings.update(do_sample=temperature > 0, **({"temperature": temperature} if temperature > 0 else {}))
        return GenerationConfig.from_dict(settings)

    # -- forward passes ---------------------------------------------------------------------------------
    def _run(self, rows: list[Row]) -> list[dict[str, Any]]:
        """Records for ``rows`` in their order: one pass per model and generation setting, mixing adapters where
        peft can route rows (LoRA), one pass per adapter otherwise."""
        records: list[dict[str, Any] | None] = [None] * len(rows)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, row in enumerate(rows):
            settings = json.dumps(row.generation.to_dict(), sort_keys=True, default=str) if row.generation else ""
            alone = row.adapter.name if row.adapter.method not in MIXABLE_METHODS else ""
            groups.setdefault((row.adapter.head, settings, alone), []).append(index)
        for (head, _, _), indices in groups.items():
            chosen = [rows[i] for i in indices]
            for index, record in zip(indices, self._run_group(self.models[head], chosen), strict=True):
                records[index] = record
        return records  # type: ignore[return-value]

    @torch.inference_mode()
    def _run_group(self, model: PeftModel | torch.nn.Module, rows: list[Row]) -> list[dict[str, Any]]:
        task = rows[0].adapter.task
        if task in ("seq2seq", "causal_lm"):
            return self._generate(model, rows)
        records: list[dict[str, Any] | None] = [None] * len(rows)
        for bucket in length_buckets([len(row.input_ids) for row in rows]):
            chosen = [rows[i] for i in bucket]
            inputs = self._padded([row.input_ids for row in chosen], self.tokenizers[chosen[0].adapter.name], "right")
            logits = self._forward(model, chosen, inputs).float()
            if task == "classification":
                answers = self._class_records(chosen, logits)
            else:
                answers = [sentence_record(row.given["words"], first_subtoken_tags(
                    scores, row.word_ids, len(row.given["words"]), row.adapter.labels))
                    for row, scores in zip(chosen, logits.argmax(-1).tolist(), strict=True)]
            for i, record in zip(bucket, answers, strict=True):
                records[i] = record
        return records  # type: ignore[return-value]

    @contextlib.contextmanager
    def _routed(self, model: PeftModel | torch.nn.Module, rows: list[Row], gather: bool) -> Iterator[dict[str, Any]]:
        """Within the block, ``model`` runs each row with its adapter: the one adapter set active, or the keyword
        arguments to pass (peft's ``adapter_names``; with ``gather``, LoRA updates gathered per row where every
        layer is plain LoRA)."""
        names = [row.adapter.name for row in rows]
        if not isinstance(model, PeftModel):  # a compressed export: one model, nothing to route
            yield {}
            return
        if len(set(names)) == 1:
            model.set_adapter(names[0])
            yield {}
            return
        head = rows[0].adapter.head
        if gather and head not in self._gathered:
            self._gathered[head] = GatheredLora.of(model)
        gathered = self._gathered.get(head) if gather else None
        with gathered.routing(names) if gathered else contextlib.nullcontext():
            yield {"adapter_names": names}

    def _forward(self, model: PeftModel | torch.nn.Module, rows: list[Row],
                 inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of one forward pass, each row routed to its adapter."""
        with self._routed(model, rows, gather=True) as routing:
            logits = model(**inputs, **routing).logits
        return logits[:, -inputs["input_ids"].shape[1]:]  # prompt tuning / p-tuning prepend virtual tokens

    def _padded(self, sequences: list[list[int]], tokenizer: Any, side: str) -> dict[str, torch.Tensor]:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        width = max(len(ids) for ids in sequences)
        ids = torch.full((len(sequences), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, row in enumerate(sequences):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    @staticmethod
    def _class_records(rows: list[Row], logits: torch.Tensor) -> list[dict[str, Any]]:
        records = []
        for row, scores in zip(rows, logits, strict=True):
            adapter = row.adapter
            if adapter.problem_type == "regression" or not adapter.labels:
                output = {"score": float(scores[0])}
            elif adapter.problem_type == "multi_label_classification":
                probabilities = torch.sigmoid(scores).tolist()
                output = {"labels": [n for n, p in zip(adapter.labels, probabilities, strict=True)
                                     if p >= MULTI_LABEL_THRESHOLD],
                          "probabilities": dict(zip(adapter.labels, probabilities, strict=True))}
            else:
                distribution = summarise_samples((scores / adapter.temperature).softmax(-1)[None, None])
                output = label_records(distribution, list(adapter.labels))[0]
            records.append({**row.given, **output})
        return records

    def _generate(self, model: PeftModel, rows: list[Row]) -> list[dict[str, Any]]:
        causal = rows[0].adapter.task == "causal_lm"
        tokenizer = self.tokenizers[rows[0].adapter.name]
        inputs = self._padded([row.input_ids for row in rows], tokenizer, "left" if causal else "right")
        with self._routed(model, rows, gather=False) as routing:  # beams would not match gathered rows
            sequences = model.generate(**inputs, generation_config=rows[0].generation, **routing)
        if causal:
            texts = [text.strip() for text in tokenizer.batch_decode(sequences[:, inputs["input_ids"].shape[1]:],
                                                                      skip_special_tokens=True)]
        else:
            texts = tokenizer.batch_decode(sequences, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        return [{**row.given, "prediction": text} for row, text in zip(rows, texts, strict=True)]
