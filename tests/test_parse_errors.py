"""A wrong key, type or value in the YAML is one line naming the key and the fix, not usage and a nested report."""

from __future__ import annotations

import pytest
import yaml

from lightning_peft.parse_errors import describe_parse_error
from tests.test_cli import REPO, assert_one_error, run_main, write_config


def edited_config(tmp_path, tiny_bert_dir, toy_data, edit) -> str:
    config = yaml.safe_load(write_config(tmp_path, tiny_bert_dir, toy_data).read_text())
    edit(config)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def rename(section: dict, old: str, new: str) -> None:
    section[new] = section.pop(old)


CASES = {
    "misspelt-data-key": (lambda c: rename(c["data"]["init_args"], "batch_size", "batch_sizee"),
                          "error: data.init_args.batch_sizee: not an option of lightning_peft.Classification"),
    "wrong-type": (lambda c: c["data"]["init_args"].update(batch_size="sixteen"),
                   "error: data.init_args.batch_size: expected int, got 'sixteen'"),
    "nested-peft-value": (lambda c: c["model"]["init_args"]["peft"]["init_args"].update(r="four"),
                          "error: model.init_args.peft.init_args.r: expected int, got 'four'"),
    "misspelt-backbone-key": (
        lambda c: rename(c["model"]["init_args"]["backbone"], "pretrained_model_name_or_path", "model_path"),
        "error: model.init_args.backbone.model_path: not an option of backbone"),
    "unknown-class": (lambda c: c["data"].update(class_path="lightning_peft.ClassifcationDataModule"),
                      "error: data.class_path: cannot use 'lightning_peft.ClassifcationDataModule'"),
    "misspelt-trainer-key": (lambda c: rename(c["trainer"], "max_epochs", "max_epoch"),
                             "error: Subcommand 'fit' does not accept option 'trainer.max_epoch'"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_key_or_type_is_named_first(case, tmp_path, tiny_bert_dir, toy_data, capsys):
    edit, first = CASES[case]
    result = run_main(capsys, "fit", "--config", edited_config(tmp_path, tiny_bert_dir, toy_data, edit))
    line = assert_one_error(result, "lightning-peft fit --help")
    assert line.startswith(first), line
    assert "usage:" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.init_args.training.lr", "-0.1"], "model.init_args.training.lr: must be >= 0, auto or null"),
        (["--trainer.max_epochs", "-3"], "trainer: `max_epochs` must be a non-negative integer"),
        (["--trainer.accumulate_grad_batches", "0"],  # Lightning takes it, then divides by it
         "trainer.accumulate_grad_batches: must be 1 or more (batches per optimizer step), got 0"),
        (["--model.init_args.training.lr_scheduler_type", "cosine_annealing"],
         "model.init_args.training.lr_scheduler_type: 'cosine_annealing' is not a transformers scheduler; use one of"),
        (["--trainer.val_check_interval", "1000"],  # Lightning checks it against the data at fit start
         "trainer: `val_check_interval` (1000) must be less than or equal to the number of the training batches"),
        (["--config", str(REPO / "configs" / "peft" / "adalora.yaml"),  # AdaLoRA's scheduler asks for it first
          "--trainer.val_check_interval", "1000"],
         "trainer: `val_check_interval` (1000) must be less than or equal to the number of the training batches"),
        (["--model.init_args.training.warmup_ratio", "1.5"], "warmup_ratio: must be in [0, 1)"),
        (["--model.init_args.training.lr", "fastest"],  # a union: every member that refused it, and the value
         "model.init_args.training.lr: expected float or 'auto' or null, got 'fastest'"),
        (["--model.init_args.training.micro_batch_size", "x"],
         "model.init_args.training.micro_batch_size: expected int or null, got 'x'"),
        (["--data.init_args.problem_type", "binary"],
         "data.init_args.problem_type: expected 'single_label_classification' or 'multi_label_classification' or "
         "'regression', got 'binary'"),
        (["--model.init_args.training.lr", "null"],  # jsonargparse passes this nested null on as the text 'None'
         "got 'None' (write null as `null`; on the command line give the enclosing option as YAML: "
         "--model.init_args.training '{lr: null}')"),
    ],
    ids=["negative-lr", "negative-epochs", "no-accumulation", "scheduler", "validation-interval",
         "validation-interval-adalora", "warmup-ratio",
         "lr-word", "union", "literal", "nested-null"],
)
def test_an_invalid_value_is_one_error_line(args, message, tmp_path, tiny_bert_dir, toy_data, capsys):
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    result = run_main(capsys, "fit", "--config", str(config), *args)
    assert_one_error(result, message)
    assert not (tmp_path / "ckpt").exists()


def test_the_suggested_form_of_a_nested_null_is_accepted(tmp_path, tiny_bert_dir, toy_data, capsys):
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    result = run_main(capsys, "fit", "--config", str(config), "--model.init_args.training", "{lr: null}",
                      "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    assert yaml.safe_load(result.stdout)["model"]["init_args"]["training"]["lr"] is None


def test_a_missing_config_file_is_named():
    message = 'Parser key "config": File does not exist: \'x.yaml\''
    assert describe_parse_error(message, ["fit"]).startswith("config: File does not exist: 'x.yaml'; run ")


def test_a_broken_yaml_file_and_an_unknown_subcommand_are_named(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    line = assert_one_error(run_main(capsys, "fit", "--config", str(broken)))
    assert line.startswith("error: --config: the file is not valid YAML (while parsing a flow sequence line 1,")
    line = assert_one_error(run_main(capsys, "fitt", "--config", str(broken)))
    assert "invalid choice: 'fitt'" in line and "run `lightning-peft --help`" in line
