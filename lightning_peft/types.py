"""Shared vocabulary every layer may import (data, tasks, callbacks): it imports nothing of lightning-peft."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

#: label of positions no loss is computed on (padding, non-first sub-tokens, prompt tokens)
IGNORE_INDEX = -100

#: what a classification head predicts; the datamodule discovers it and the CLI passes it to the model
ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]

#: a collated batch: model inputs as tensors, plus raw columns (texts, words) passed through as lists
Batch = dict[str, Any]

#: a term added to the training loss: called with the (prepared) batch and the task loss
LossTerm = Callable[[Batch, torch.Tensor], torch.Tensor]
