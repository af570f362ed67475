"""``AdversarialTraining``: FGM / PGD on the embedding output, weights untouched, loss changed."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from peft import LoraConfig

from lightning_peft import (
    ClassificationDataModule,
    LightningPeftError,
    SequenceClassifier,
    TokenClassifier,
    TrainingConfig,
)
from lightning_peft.batching import MicroBatches
from lightning_peft.callbacks import LearningRateSearch
from lightning_peft.callbacks.adversarial import AdversarialTraining, per_example_unit, project
from lightning_peft.learning_rate_search import MIN_STEPS
from tests.test_batching import padded_batch


def model_and_batch(backbone, peft: bool, task: str = "classification"):
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False) if peft else None
    batch = padded_batch([5, 9, 3, 7, 4])
    if task == "classification":
        model = SequenceClassifier(backbone, lora, labels=["a", "b"], training={"micro_batch_size": 2})
        batch["labels"] = torch.tensor([0, 1, 1, 0, 1])
    else:
        model = TokenClassifier(backbone, lora, labels=["O", "B-X", "I-X"], training={"micro_batch_size": 2})
        batch["labels"] = torch.randint(0, 3, batch["input_ids"].shape).masked_fill(batch["attention_mask"] == 0, -100)
    model.eval()  # no dropout: the same clean function before and after
    model.batching = MicroBatches(2)  # what a fit with this callback chooses (it declares no packed rows)
    return model, batch


@pytest.mark.parametrize("method", ["fgm", "pgd"])
@pytest.mark.parametrize("peft", [True, False], ids=["lora-frozen-embeddings", "full-fine-tuning"])
def test_perturbation_changes_the_loss_and_leaves_embeddings_exact(backbone, method, peft):
    model, batch = model_and_batch(backbone, peft)
    embeddings = model.model.get_input_embeddings()
    assert embeddings.weight.requires_grad is not peft
    weights = embeddings.weight.detach().clone()
    clean_logits = model(batch).detach()
    callback = AdversarialTraining(method=method, epsilon=0.5, alpha=0.2, steps=3)
    assert not callback.supports_sequence_packing, "perturbations are bounded per example: no packed rows"
    callback.setup(None, model, "fit")
    callback.on_train_batch_start(None, model, batch, 0)
    clean_loss = model.batch_loss(batch)  # three micro-batches of at most 2 rows
    adversarial = model.loss_terms["adversarial"](batch, clean_loss)
    assert adversarial.item() > clean_loss.item() + 1e-4, "an ascent step on the loss must raise it"
    (clean_loss + adversarial).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert torch.equal(embeddings.weight, weights), "embedding weights are never modified"
    assert torch.equal(model(batch), clean_logits), "outside the step the hook passes outputs through"
    callback.on_fit_end(None, model)
    assert "adversarial" not in model.loss_terms and not embeddings._forward_hooks
    assert torch.equal(model(batch), clean_logits)


def test_works_for_tagging(backbone):
    model, batch = model_and_batch(backbone, peft=True, task="tagging")
    callback = AdversarialTraining(method="fgm", epsilon=0.5)
    callback.setup(None, model, "fit")
    callback.on_train_batch_start(None, model, batch, 0)
    clean_loss = model.batch_loss(batch)
    assert model.loss_terms["adversarial"](batch, clean_loss).item() > clean_loss.item()


def test_fgm_and_pgd_perturbations_stay_in_the_epsilon_ball():
    grad = torch.randn(3, 4, 5)
    assert torch.allclose(per_example_unit(grad).flatten(1).norm(dim=1), torch.ones(3))
    assert torch.equal(per_example_unit(torch.zeros(2, 3)), torch.zeros(2, 3))
    delta = torch.randn(3, 4, 5) * 10
    norms = project(delta, 0.5).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full((3,), 0.5))
    small = torch.full((1, 2), 0.01)
    assert torch.equal(project(small, 0.5), small)


@pytest.mark.parametrize(
    ("options", "field"),
    [({"epsilon": -1.0}, "epsilon"), ({"method": "fsgm"}, "method"), ({"steps": 0}, "steps"),
     ({"alpha": 0}, "alpha")],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(LightningPeftError, match=f"AdversarialTraining.{field}"):
        AdversarialTraining(**options)


def test_model_without_embedding_access_is_refused(backbone):
    model, _ = model_and_batch(backbone, peft=True)
    model.model.get_input_embeddings = lambda: None
    with pytest.raises(LightningPeftError, match="no access to its input embeddings"):
        AdversarialTraining().setup(None, model, "fit")


def test_fit_from_yaml_with_pgd_rdrop_and_l2_logs_each_term(tmp_path, tiny_bert_dir, toy_data, capsys):
    import yaml

    from lightning_peft.cli import main
    from tests.test_cli import write_config

    config_path = write_config(tmp_path, tiny_bert_dir, toy_data, limit_train_samples=64)
    config = yaml.safe_load(config_path.read_text())
    config["trainer"] |= {"max_epochs": 1, "log_every_n_steps": 1}
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning_peft.callbacks.AdversarialTraining", "init_args": {"method": "pgd", "steps": 2}}
    ]
    config["model"]["init_args"]["training"]["regularization"] = {
        "rdrop_alpha": 1.0, "trainable_l2": 1e-3, "label_smoothing": 0.1,
    }
    config_path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(config_path)])
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/adversarial", "train/trainable_l2", "val/accuracy"} <= set(header)

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config_path), "--trainer.callbacks.init_args.epsilon", "-1"])
    assert exit_info.value.code == 2
    assert "error: AdversarialTraining.epsilon: must be > 0, got -1" in capsys.readouterr().err


class CountedAdversarial(AdversarialTraining):
    calls = 0

    def adversarial_loss(self, pl_module, batch, clean_loss):
        self.calls += 1
        return super().adversarial_loss(pl_module, batch, clean_loss)


class AdversarialStepsOfTheSearch(LearningRateSearch):
    """How many steps of the range test trained the adversarial loss."""

    def __init__(self, adversarial: CountedAdversarial, **kwargs) -> None:
        super().__init__(**kwargs)
        self.adversarial = adversarial

    def on_fit_start(self, trainer, pl_module) -> None:
        before = self.adversarial.calls
        super().on_fit_start(trainer, pl_module)
        self.adversarial_steps = self.adversarial.calls - before


def test_learning_rate_range_test_trains_the_adversarial_loss(backbone, tiny_bert_dir, toy_data, tmp_path):
    dm = ClassificationDataModule(tokenizer=str(tiny_bert_dir), train_file=str(toy_data["train"]), batch_size=8)
    model = SequenceClassifier(backbone, LoraConfig(r=4, target_modules=["query", "value"]), labels=dm.labels,
                               training=TrainingConfig(lr="auto"))
    adversarial = CountedAdversarial()
    search = AdversarialStepsOfTheSearch(adversarial, num_training_steps=MIN_STEPS, min_lr=1e-3, max_lr=1.0)
    trainer = pl.Trainer(max_steps=8, callbacks=[adversarial, search], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert search.adversarial_steps == len(search.losses) == MIN_STEPS
    assert adversarial.calls == MIN_STEPS + 8 and "adversarial" not in model.loss_terms


@pytest.mark.parametrize("method", ["prompt_tuning", "ia3"])
def test_works_with_other_peft_methods(backbone, method):
    from peft import IA3Config, PromptTuningConfig

    torch.manual_seed(0)
    config = (PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS") if method == "prompt_tuning"
              else IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                             init_ia3_weights=False))
    model = SequenceClassifier(backbone, config, labels=["a", "b"]).eval()
    model.batching = MicroBatches(16)  # what a fit with this callback chooses
    batch = padded_batch([5, 9, 3])
    batch["labels"] = torch.tensor([0, 1, 1])
    callback = AdversarialTraining(method="pgd", epsilon=0.5, steps=2)
    callback.setup(None, model, "fit")
    callback.on_train_batch_start(None, model, batch, 0)
    clean_loss = model.batch_loss(batch)
    adversarial = model.loss_terms["adversarial"](batch, clean_loss)
    assert adversarial.item() > clean_loss.item()
    adversarial.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_works_for_seq2seq_with_rdrop(tiny_t5_dir):
    from lightning_peft import BackboneConfig, Seq2SeqGenerator

    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False, lora_dropout=0.3)
    model = Seq2SeqGenerator(BackboneConfig(str(tiny_t5_dir)), lora, training={"regularization": {"rdrop_alpha": 1.0}})
    model.train()
    batch = padded_batch([5, 9, 3], vocab=20)
    batch.pop("token_type_ids")
    batch["labels"] = torch.randint(5, 20, (3, 4))
    batch["labels"][0, 3] = -100
    callback = AdversarialTraining(method="fgm", epsilon=0.5)
    callback.setup(None, model, "fit")
    callback.on_train_batch_start(None, model, batch, 0)
    clean_loss = model.batch_loss(batch)  # R-Drop: two dropout passes inside
    adversarial = model.loss_terms["adversarial"](batch, clean_loss)
    assert torch.isfinite(adversarial) and adversarial.item() > 0
    (clean_loss + adversarial).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_an_exception_during_fit_surfaces_and_the_task_is_restored(backbone):
    model, batch = model_and_batch(backbone, peft=True)
    callback = AdversarialTraining()
    callback.on_exception(None, model, RuntimeError("before fit start"))  # nothing to undo yet
    callback.setup(None, model, "fit")
    callback.on_exception(None, model, RuntimeError("in a training step"))
    embeddings = model.model.get_input_embeddings()
    assert "adversarial" not in model.loss_terms and not embeddings._forward_hooks


def test_a_plain_lightning_module_gets_the_clear_error():
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = pl.Trainer(max_steps=1, callbacks=[AdversarialTraining()], logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)
    with pytest.raises(LightningPeftError, match="AdversarialTraining: needs a lightning-peft task"):
        trainer.fit(BoringModel())
