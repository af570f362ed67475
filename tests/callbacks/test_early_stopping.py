from __future__ import annotations

import yaml
from lightning.pytorch.callbacks import Callback

from lightning_peft.cli import LightningPeftCLI, main
from tests.test_cli import REPO, write_config


class CountValidations(Callback):
    def __init__(self) -> None:
        self.runs = 0

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.runs += 1


def with_preset(tmp_path, tiny_bert_dir, toy_data, **trainer) -> list[str]:
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    data = yaml.safe_load(config.read_text())
    data["trainer"].update(trainer)
    config.write_text(yaml.safe_dump(data))
    return ["--config", str(config), "--config", str(REPO / "configs" / "callbacks" / "early_stopping.yaml")]


def test_preset_follows_the_checkpoint_metric_and_patience_counts_validation_runs(tmp_path, tiny_bert_dir, toy_data):
    args = with_preset(tmp_path, tiny_bert_dir, toy_data, max_epochs=5, val_check_interval=0.25)
    counter = CountValidations()
    # lr 0: the monitored accuracy never improves on the first validation run, so the 4th one stops the fit
    cli = LightningPeftCLI(
        args=["fit", *args, "--model.init_args.training.lr", "0"],
        trainer_defaults={"callbacks": [counter]}, save_config_callback=None,
    )
    stopper = cli.trainer.early_stopping_callback
    assert (stopper.monitor, stopper.mode, stopper.patience) == ("val/accuracy", "max", 3)
    assert counter.runs == 1 + 3 and cli.trainer.global_step == 20  # stopped after the first of 5 epochs (20 steps)


def test_best_checkpoint_is_what_gets_exported(tmp_path, tiny_bert_dir, toy_data):
    import torch
    from safetensors.torch import load_file

    args = with_preset(tmp_path, tiny_bert_dir, toy_data, max_epochs=30)  # stops once accuracy plateaus
    cli = LightningPeftCLI(args=["fit", *args], save_config_callback=None)
    best = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True)
    assert best["global_step"] < cli.trainer.global_step < 30 * 20  # stopped early, some steps after the best
    main(["export", "--config", args[1], "--ckpt_path", str(tmp_path / "ckpt" / "best.ckpt"),
          "--export_dir", str(tmp_path / "export")])
    exported = load_file(tmp_path / "export" / "adapter" / "adapter_model.safetensors")
    key = next(k for k in best["state_dict"] if "lora_A" in k)  # model.base_model.….lora_A.default.weight
    weight = exported[key.removeprefix("model.").replace(".default", "")]
    assert torch.equal(weight, best["state_dict"][key])
    assert not torch.equal(weight, cli.model.state_dict()[key])  # not the weights the fit ended with
