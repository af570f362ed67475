"""``lightning-peft``: LightningCLI with our links and defaults, plus an ``export`` command.

    lightning-peft fit --config configs/quickstart.yaml
    lightning-peft test --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/best.ckpt
    lightning-peft predict --config configs/quickstart.yaml --ckpt_path … --predictions_path preds.jsonl
    lightning-peft export --config configs/quickstart.yaml --ckpt_path … --export_dir runs/quickstart/export [--merge]
    lightning-peft explain --config configs/quickstart.yaml --ckpt_path … --input "the food was great"
    lightning-peft sweep configs/sweeps/quickstart.yaml --trials 2
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lightning_peft.callbacks.prediction_writer import JsonlPredictionWriter
from lightning_peft.data.base import TextDataModule
from lightning_peft.errors import LightningPeftError
from lightning_peft.explain import METHODS, explain
from lightning_peft.export import export_checkpoint, load_checkpoint, weights_from
from lightning_peft.sweep import sweep_main
from lightning_peft.tasks.base import PeftModule

# jsonargparse builds every dataclass field of a peft config, including an empty LoftQConfig that peft then
# warns about although LoftQ is not in use.
warnings.filterwarnings("ignore", message=r"`loftq_config` specified but will be ignored")


def _tokenizer_of(path: str | None, tokenizer: str | None) -> str | None:
    return tokenizer or path


class LoggedConfig(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback`` (``config.yaml`` in the log directory) that also sends the full resolved
    configuration to every logger as the hyper-parameter ``config``: W&B shows and filters runs by it, and a sweep
    trial's values (passed as CLI arguments) are recorded with the run."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = self.config.clone()
        config.pop("config", None)  # the paths of the YAML files; their content is in the rest
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config.as_dict()})


class LightningPeftCLI(LightningCLI):
    """LightningCLI for any :class:`PeftModule` and :class:`TextDataModule` subclass (``class_path`` in YAML).

    Links so that one YAML drives everything: the backbone's path (or ``backbone.tokenizer``) becomes the
    datamodule's tokenizer; a labelled datamodule's discovered ``labels`` (and ``problem_type``) become the model's.
    Adds a ``checkpoint`` group (Lightning's ``ModelCheckpoint``: best on ``val/loss`` plus ``last``),
    ``--predictions_path`` for ``predict`` (JSONL), a CSV logger under ``runs/`` and a rich progress bar.

    Example::

        LightningPeftCLI(args=["fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "1"])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", PeftModule)
        kwargs.setdefault("datamodule_class", TextDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", LoggedConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        defaults = {
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
        }
        kwargs["trainer_defaults"] = {**defaults, **kwargs.get("trainer_defaults", {})}
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
            }
        )
        parser.add_argument(
            "--predictions_path", type=str | None, default=None,
            help="predict: JSONL output path (default: <log dir>/predictions.jsonl)",
        )
        parser.link_arguments(
            ("model.init_args.backbone.pretrained_model_name_or_path", "model.init_args.backbone.tokenizer"),
            "data.init_args.tokenizer",
            compute_fn=_tokenizer_of,
        )
        # skipped by jsonargparse when the datamodule has no ``labels`` (seq2seq data, whose model takes none)
        parser.link_arguments("data.labels", "model.init_args.labels", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Share the datamodule's ``problem_type`` with the model when both take one (a conditional link:
        jsonargparse links cannot skip a target that the chosen model class lacks)."""
        config = self.config.get(str(self.subcommand), self.config)
        data, model = config.get("data"), config.get("model")
        if data is None or model is None:
            return
        if "problem_type" in data.get("init_args", {}) and "problem_type" in model.get("init_args", {}):
            model.init_args.problem_type = data.init_args.problem_type

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, with a rich progress bar unless progress bars are off or one is configured."""
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, RichProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def before_predict(self) -> None:
        if any(isinstance(cb, JsonlPredictionWriter) for cb in self.trainer.callbacks):
            return
        path = self._get(self.config, "predictions_path") or str(
            Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions.jsonl"
        )
        self.trainer.callbacks.append(JsonlPredictionWriter(path))

    def predict(self, model: LightningModule, **kwargs: Any) -> None:
        kwargs["return_predictions"] = False  # records stream to the JSONL writer instead of piling up in memory
        self.trainer.predict(model, **kwargs)


def standalone(cli_class: type[LightningPeftCLI], args: list[str], **kwargs: Any) -> LightningPeftCLI:
    """``cli_class`` parsed from ``args`` (and its classes built, unless it overrides that) without running a
    subcommand or saving a config: what ``export``, ``explain`` and local sweeps work from."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # args are the point here
        return cli_class(args=args, run=False, save_config_callback=None, **kwargs)


class CheckpointCLI(LightningPeftCLI):
    """Base of the commands that rebuild the model from the config and work from ``--ckpt_path``."""

    ckpt_help = "checkpoint to load"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--ckpt_path", type=str, required=True, help=self.ckpt_help)

    @property
    def text_datamodule(self) -> TextDataModule | None:
        return self.datamodule if isinstance(self.datamodule, TextDataModule) else None


class ExportCLI(CheckpointCLI):
    """``lightning-peft export``: rebuild the model from the config, load a checkpoint, write an HF export."""

    ckpt_help = "checkpoint to export"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--export_dir", type=str, required=True,
            help="directory to write: adapter/, merged/ with --merge, README.md (replaced atomically)",
        )
        parser.add_argument("--merge", type=bool, default=False, help="also write merged/, a full transformers model")

    def run_export(self) -> Path:
        """What :class:`~lightning_peft.callbacks.AdapterExport` writes at fit end, from ``--ckpt_path``."""
        datamodule = self.text_datamodule
        return export_checkpoint(
            self.model, self.config["ckpt_path"], self.config["export_dir"],
            tokenizer=datamodule.tokenizer if datamodule else None, merge=self.config["merge"],
            data=datamodule.card_facts() if datamodule else None,
        )


class ExplainCLI(CheckpointCLI):
    """``lightning-peft explain``: rebuild the model from the config, load a checkpoint, attribute one input."""

    ckpt_help = "checkpoint whose model to explain"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--input", type=str, required=True, help="the text to explain (a tagger: words split on "
                            "whitespace)")
        parser.add_argument("--output_dir", type=str | None, default=None,
                            help="where explanation.html and explanation.json go (default: <default_root_dir>/"
                            "explanations)")
        parser.add_argument("--methods", type=list[str], default=list(METHODS), help=f"any of {list(METHODS)}")
        parser.add_argument("--target", type=str | None, default=None,
                            help="classifier label to explain (default: the predicted one)")
        parser.add_argument("--n_steps", type=int, default=50, help="integrated-gradients steps")

    def run_explain(self) -> tuple[Path, Path]:
        datamodule = self.text_datamodule
        if datamodule is None:
            raise LightningPeftError("explain: needs the config's data section for its tokenizer")
        with weights_from(self.model, load_checkpoint(self.config["ckpt_path"])):
            explanation = explain(
                self.model, datamodule.tokenizer, self.config["input"], methods=self.config["methods"],
                target=self.config["target"], n_steps=self.config["n_steps"], max_length=datamodule.max_length,
            )
        for attribution in explanation.attributions:
            for method, scores in attribution.scores.items():
                top = sorted(zip(scores, explanation.tokens, strict=True), key=lambda p: -abs(p[0]))[:5]
                print(f"{attribution.target} | {method}: " + ", ".join(f"{t} {s:+.3f}" for s, t in top))
        if not explanation.attributions:
            print(f"nothing to explain: no entity predicted in {explanation.text!r}")
        output_dir = self.config["output_dir"] or Path(self.trainer.default_root_dir) / "explanations"
        return explanation.save(output_dir)


def _user_error(err: BaseException) -> LightningPeftError | None:
    """The :class:`LightningPeftError` behind ``err``, if any (jsonargparse wraps errors raised in links)."""
    while err is not None and not isinstance(err, LightningPeftError):
        err = err.__cause__ or err.__context__
    return err


def main(args: list[str] | None = None) -> None:
    """Console entry point: user errors become one ``error:`` line and exit status 2."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] == "export":
            print(f"exported to {standalone(ExportCLI, argv[1:]).run_export()}")
        elif argv and argv[0] == "explain":
            html_path, json_path = standalone(ExplainCLI, argv[1:]).run_explain()
            print(f"explanation written to {html_path} and {json_path}")
        elif argv and argv[0] == "sweep":
            sweep_main(argv[1:])
        else:
            LightningPeftCLI(args=args)
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
