"""What a run writes, and where: never over files it did not write, never beside an earlier run's results."""

from __future__ import annotations

import os

import torch
import yaml

from tests.test_cli import assert_one_error, run_cli, run_main, write_config


def test_export_never_replaces_what_it_did_not_write(fitted, tmp_path, capsys):
    best = str(fitted["ckpt"] / "best.ckpt")
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    notes = tmp_path / "notes.txt"
    notes.write_text("notes")
    result = run_cli("export", "--config", str(fitted["config"]), "--ckpt_path", best, "--export_dir", str(thesis),
                     cwd=tmp_path)
    assert_one_error(result, "export_dir:", str(thesis), "--overwrite true")
    result = run_main(capsys, "export", "--config", str(fitted["config"]), "--ckpt_path", best, "--export_dir",
                      str(notes))
    assert_one_error(result, "export_dir:", str(notes), "is an existing file", "--overwrite true")
    assert (thesis / "thesis.tex").read_text() == "years of work" and notes.read_text() == "notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "thesis"]

    export = tmp_path / "export"
    for _ in range(2):  # an earlier export is ours to replace
        result = run_main(capsys, "export", "--config", str(fitted["config"]), "--ckpt_path", best, "--export_dir",
                          str(export))
        assert result.returncode == 0, result.stderr[-3000:]
    result = run_main(capsys, "export", "--config", str(fitted["config"]), "--ckpt_path", best, "--export_dir",
                      str(thesis), "--overwrite", "true")
    assert result.returncode == 0 and (thesis / "adapter").is_dir() and not (thesis / "thesis.tex").exists()


def test_export_under_an_impossible_path_is_one_error(fitted, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    result = run_main(capsys, "export", "--config", str(fitted["config"]), "--ckpt_path", "best",
                      "--export_dir", str(tmp_path / "file.txt" / "export"))
    assert_one_error(result, "export_dir: cannot write", "choose another path")


def test_a_rerun_never_mixes_with_an_earlier_run(tmp_path, tiny_bert_dir, toy_data, capsys):
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    ckpt = tmp_path / "ckpt"
    first = run_cli("fit", "--config", str(config), "--trainer.max_epochs", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    earlier = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}

    again = run_main(capsys, "fit", "--config", str(config), "--trainer.max_epochs", "1")
    assert_one_error(again, "checkpoint.dirpath:", "earlier run's checkpoints", "--overwrite true", "--ckpt_path last")
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == earlier

    replaced = run_main(capsys, "fit", "--config", str(config), "--trainer.max_epochs", "1", "--overwrite", "true")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.ckpt", "last.ckpt"]  # no best-v1.ckpt
    assert all(p.stat().st_mtime_ns > earlier[p.name] for p in ckpt.iterdir())

    resumed = run_main(capsys, "fit", "--config", str(config), "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_last_checkpoint_is_the_latest_state_even_when_the_metric_does_not_improve(tmp_path, tiny_bert_dir, toy_data,
                                                                                   capsys):
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    run_main(capsys, "fit", "--config", str(config), "--trainer.max_epochs", "3",
             "--model.init_args.training.lr", "0")  # nothing improves after the first epoch
    best = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert best["epoch"] == 0 and last["epoch"] == 2  # Lightning alone leaves last.ckpt at epoch 0


def test_logs_go_under_the_runs_default_root_dir(tmp_path, tiny_bert_dir, toy_data):
    config = yaml.safe_load(write_config(tmp_path, tiny_bert_dir, toy_data).read_text())
    del config["trainer"]["logger"]  # the CLI's default logger
    del config["checkpoint"]["dirpath"]
    path = tmp_path / "no_logger.yaml"
    path.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    result = run_cli("fit", "--config", str(path), "--trainer.max_epochs", "1", "--trainer.default_root_dir",
                     str(tmp_path / "elsewhere"), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(workdir.iterdir()) == []  # nothing in the working directory (it used to get runs/lightning_logs)
    version = tmp_path / "elsewhere" / "lightning_logs" / "version_0"
    assert (version / "metrics.csv").is_file() and (version / "checkpoints" / "last.ckpt").is_file()


def test_an_unwritable_checkpoint_directory_stops_the_fit_before_training(tmp_path, tiny_bert_dir, toy_data, capsys):
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    (tmp_path / "file.txt").write_text("x")
    result = run_main(capsys, "fit", "--config", str(config), "--checkpoint.dirpath", str(tmp_path / "file.txt" / "c"))
    assert_one_error(result, "checkpoint.dirpath: cannot write checkpoints to", "choose a writable directory")
    if os.geteuid() != 0:  # root writes anywhere; elsewhere a read-only directory is refused the same way
        (tmp_path / "ro").mkdir(mode=0o500)
        result = run_main(capsys, "fit", "--config", str(config), "--checkpoint.dirpath", str(tmp_path / "ro" / "c"))
        assert_one_error(result, "checkpoint.dirpath: cannot write checkpoints to")


def test_predict_replaces_only_earlier_predictions(fitted, tmp_path, capsys):
    thesis = tmp_path / "thesis.tex"
    thesis.write_text("\\chapter{Years of work}\n")
    args = ["predict", "--config", str(fitted["config"]), "--ckpt_path", "best", "--predictions_path"]
    result = run_main(capsys, *args, str(thesis))
    assert_one_error(result, "predictions_path:", "is not an earlier predictions file", "--overwrite true")
    assert thesis.read_text() == "\\chapter{Years of work}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]  # no temporary file left
    predictions = tmp_path / "predictions.jsonl"
    for _ in range(2):  # an earlier predictions file is replaced
        assert run_main(capsys, *args, str(predictions)).returncode == 0
    assert len(predictions.read_text().splitlines()) == 3
