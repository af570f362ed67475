"""``lightning-peft``: LightningCLI with our links and defaults, plus an ``export`` command.

    lightning-peft fit --config configs/quickstart.yaml
    lightning-peft test --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/best.ckpt
    lightning-peft predict --config configs/quickstart.yaml --ckpt_path … --predictions_path preds.jsonl
    lightning-peft export --config configs/quickstart.yaml --ckpt_path … --export_dir runs/quickstart/export [--merge]
    lightning-peft explain --config configs/quickstart.yaml --ckpt_path … --input "the food was great"
    lightning-peft sweep configs/sweeps/quickstart.yaml --trials 2
    lightning-peft convert-gguf --gguf_file model.Q4_1.gguf --output_dir models/model
    lightning-peft serve --adapters sentiment=runs/quickstart/export --port 8000
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_peft.backbone import tokenizer_source
from lightning_peft.callbacks.prediction_writer import JsonlPredictionWriter
from lightning_peft.callbacks.run_checkpoint import RunCheckpoint
from lightning_peft.checkpoints import check_checkpoint_matches, load_checkpoint, resolve_named_checkpoint
from lightning_peft.compressed import check_compression_available
from lightning_peft.data.base import TextDataModule
from lightning_peft.errors import LightningPeftError
from lightning_peft.explain import METHODS, explain
from lightning_peft.export import export_checkpoint, push_export, weights_from
from lightning_peft.gguf import convert_main
from lightning_peft.parse_errors import describe_parse_error
from lightning_peft.quantization import check_strategy
from lightning_peft.sweep import sweep_main
from lightning_peft.tasks.base import PeftModule

#: jsonargparse builds every dataclass field of a peft config, including an empty LoftQConfig that peft then warns
#: about although LoftQ is not in use; silenced while a CLI runs, not process-wide at import
LOFTQ_NOISE = r"`loftq_config` specified but will be ignored"


DEFAULT_ROOT_DIR = "runs"  # where a run writes logs (and checkpoints, exports) unless its config says otherwise
DEFAULT_GRADIENT_CLIP = 1.0  # the HF Trainer's max_grad_norm: without it LoRA runs train measurably worse
#: ``checkpoint.monitor`` default: the task's own metric (:meth:`PeftModule.checkpoint_metric`) and its mode
AUTO_MONITOR = "auto"


def _import_class(class_path: str | None) -> type | None:
    """The class a validated ``class_path`` names (jsonargparse has already imported it)."""
    module, _, name = (class_path or "").rpartition(".")
    return getattr(importlib.import_module(module), name, None) if module else None


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
    Adds a ``checkpoint`` group (:class:`RunCheckpoint`, Lightning's ``ModelCheckpoint``: ``best`` on the task's own
    metric unless ``checkpoint.monitor`` names one, plus ``last``, also written on Ctrl-C / SIGTERM),
    ``--predictions_path`` for ``predict`` (JSONL), a CSV logger under ``trainer.default_root_dir`` (``runs`` by
    default), gradient clipping at norm 1.0 (the HF Trainer's default) and a rich progress bar.

    Safe by default: ``--ckpt_path`` files are read as plain data (``weights_only``) and checked against the config,
    never merged into it; ``best`` / ``last`` name the files in ``checkpoint.dirpath``; ``fit`` refuses a
    ``checkpoint.dirpath`` that holds an earlier run's checkpoints unless it resumes from one or gets
    ``--overwrite true``; ``validate`` / ``test`` / ``predict`` without ``--ckpt_path`` refuse a model whose head is
    still untrained unless given ``--allow_untrained true``.

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
        defaults = {"default_root_dir": DEFAULT_ROOT_DIR, "gradient_clip_val": DEFAULT_GRADIENT_CLIP}
        kwargs["trainer_defaults"] = {**defaults, **kwargs.get("trainer_defaults", {})}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=LOFTQ_NOISE)
            super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Parsers that raise on bad input instead of printing their usage, so :func:`main` can name the key."""
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    #: what ``--overwrite true`` allows, per command
    overwrite_help = ("fit: replace the checkpoints of an earlier run in checkpoint.dirpath; predict: replace a file "
                      "at predictions_path that is not an earlier predictions file (default: refuse)")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": AUTO_MONITOR,
                "checkpoint.mode": "min",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
            }
        )
        parser.add_argument(
            "--predictions_path", type=str | None, default=None,
            help="predict: JSONL output path (default: <log dir>/predictions.jsonl)",
        )
        parser.add_argument("--overwrite", type=bool, default=False, help=self.overwrite_help)
        parser.add_argument(
            "--allow_untrained", type=bool, default=False,
            help="validate/test/predict without --ckpt_path: run even though the model's head is untrained",
        )
        backbone = "model.init_args.backbone."
        parser.link_arguments(
            (f"{backbone}pretrained_model_name_or_path", f"{backbone}tokenizer", f"{backbone}gguf_file"),
            "data.init_args.tokenizer",
            compute_fn=tokenizer_source,
        )
        # skipped by jsonargparse when the datamodule has no ``labels`` (seq2seq data, whose model takes none)
        parser.link_arguments("data.labels", "model.init_args.labels", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Share the datamodule's ``problem_type`` with the model when both take one (a conditional link:
        jsonargparse links cannot skip a target that the chosen model class lacks), and resolve
        ``checkpoint.monitor: auto`` to the task's metric and mode; refuse FSDP on a quantised base before any
        model loads."""
        config = self.config.get(str(self.subcommand), self.config)
        data, model = config.get("data"), config.get("model")
        if data is not None and model is not None and "problem_type" in data.get("init_args", {}) and (
            "problem_type" in model.get("init_args", {})
        ):
            model.init_args.problem_type = data.init_args.problem_type
        checkpoint = config.get("checkpoint")
        if checkpoint is not None and checkpoint.get("monitor") == AUTO_MONITOR:
            task = _import_class(model.get("class_path")) if model is not None else None
            init_args = dict(model.get("init_args") or {}) if model is not None else {}
            metric = task.checkpoint_metric(init_args) if isinstance(task, type) and issubclass(task, PeftModule) \
                else ("val/loss", "min")
            checkpoint.monitor, checkpoint.mode = metric
        quantization = config.get("model.init_args.backbone.quantization") if model is not None else None
        if quantization is not None:
            check_strategy(quantization.as_dict() if hasattr(quantization, "as_dict") else quantization,
                           config.get("trainer.strategy"))

    # -- checkpoints are data -------------------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """Resolve ``best`` / ``last``, read the checkpoint safely and check that it fits the config.

        LightningCLI would merge the checkpoint's hyper-parameters over the user's config; here a checkpoint never
        configures anything (not the backbone, not ``trust_remote_code``): a disagreement is an error instead.
        """
        config = self.config.get(str(self.config.get("subcommand")), self.config)
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        checkpoint_config = config.get("checkpoint") or {}
        ckpt_path = resolve_named_checkpoint(
            ckpt_path, checkpoint_config.get("dirpath"), checkpoint_config.get("filename")
        )
        config["ckpt_path"] = ckpt_path
        check_checkpoint_matches(load_checkpoint(ckpt_path), config.get("model"), ckpt_path)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Lightning reads ``--ckpt_path`` as plain data too (``weights_only=True``), whatever the config says."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, ()):
            kwargs["weights_only"] = True
        return kwargs

    # -- runs write only where they are told, never over another run -----------------------------------
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, with a CSV logger under ``default_root_dir`` unless a logger is configured, and a
        rich progress bar unless progress bars are off or one is configured. Invalid trainer values are one error."""
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, RichProgressBar()]
        if config.get("logger") in (None, True):
            kwargs["logger"] = CSVLogger(save_dir=config.get("default_root_dir") or DEFAULT_ROOT_DIR)
        accumulate = config.get("accumulate_grad_batches")
        if isinstance(accumulate, int) and accumulate < 1:  # Lightning takes it, then divides by it at fit start
            raise LightningPeftError(f"trainer.accumulate_grad_batches: must be 1 or more (batches per optimizer "
                                     f"step), got {accumulate}")
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as err:
            raise LightningPeftError(f"trainer: {err}") from err

    def before_fit(self) -> None:
        """Refuse to mix this run's checkpoints with an earlier run's (``best-v1.ckpt`` beside a stale
        ``best.ckpt``): resume from one (``--ckpt_path``), or replace them with ``--overwrite true``."""
        callback = self.trainer.checkpoint_callback
        dirpath = Path(callback.dirpath) if callback is not None and callback.dirpath else None
        if dirpath is None or not self.trainer.is_global_zero or self.trainer.fast_dev_run:
            return  # fast_dev_run writes no checkpoints
        earlier = sorted(dirpath.glob("*.ckpt")) if dirpath.is_dir() else []
        if earlier and not self._get(self.config, "ckpt_path"):
            if not self._get(self.config, "overwrite"):
                names = ", ".join(p.name for p in earlier[:3]) + (", …" if len(earlier) > 3 else "")
                raise LightningPeftError(
                    f"checkpoint.dirpath: {str(dirpath)!r} holds an earlier run's checkpoints ({names}); resume it "
                    f"with --ckpt_path last, write this run elsewhere with --checkpoint.dirpath, or replace them with "
                    "--overwrite true"
                )
            for path in earlier:
                path.unlink()
        existing = next(p for p in (dirpath, *dirpath.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            reason = "a file is in the way" if not existing.is_dir() else "permission denied"
            raise LightningPeftError(
                f"checkpoint.dirpath: cannot write checkpoints to {str(dirpath)!r} ({reason} at {str(existing)!r}); "
                "choose a writable directory"
            )

    def _refuse_untrained(self) -> None:
        """``validate`` / ``test`` / ``predict`` without a checkpoint would score a head nobody trained."""
        if self._get(self.config, "ckpt_path") or self._get(self.config, "allow_untrained"):
            return
        untrained = self.model.untrained_weights() if isinstance(self.model, PeftModule) else []
        if untrained:
            raise LightningPeftError(
                f"--ckpt_path: not given, and {type(self.model).__name__}'s {untrained[0]}"
                f"{f' (and {len(untrained) - 1} more)' if len(untrained) > 1 else ''} is newly initialised, not "
                f"trained; give the fitted checkpoint (--ckpt_path best, last or a file), or pass "
                "--allow_untrained true to run the untrained model"
            )

    def before_validate(self) -> None:
        self._refuse_untrained()

    def before_test(self) -> None:
        self._refuse_untrained()

    def before_predict(self) -> None:
        self._refuse_untrained()
        if any(isinstance(cb, JsonlPredictionWriter) for cb in self.trainer.callbacks):
            return
        path = self._get(self.config, "predictions_path") or str(
            Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions.jsonl"
        )
        self.trainer.callbacks.append(JsonlPredictionWriter(path, overwrite=self._get(self.config, "overwrite")))

    def predict(self, model: LightningModule, **kwargs: Any) -> None:
        kwargs["return_predictions"] = False  # records stream to the JSONL writer instead of piling up in memory
        self.trainer.predict(model, **kwargs)


def standalone(cli_class: type[LightningPeftCLI], args: list[str], **kwargs: Any) -> LightningPeftCLI:
    """``cli_class`` parsed from ``args`` (and its classes built, unless it overrides that) without running a
    subcommand or saving a config: what ``export``, ``explain`` and local sweeps work from."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # args are the point here
        return cli_class(args=args, run=False, save_config_callback=None, **kwargs)


def parse_fit_config(args: list[str]) -> tuple[Any, Any]:
    """The parser and the parsed, linked ``fit`` configuration for ``args``, without building anything (what a
    local sweep checks its trials with)."""

    class ParseOnly(LightningPeftCLI):
        def instantiate_classes(self) -> None:
            pass

    cli = standalone(ParseOnly, args, seed_everything_default=False)
    return cli.parser, cli.config


class CheckpointCLI(LightningPeftCLI):
    """Base of the commands that rebuild the model from the config and work from ``--ckpt_path``."""

    ckpt_help = "checkpoint to load (a file, or best / last in checkpoint.dirpath)"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--ckpt_path", type=str, required=True, help=self.ckpt_help)

    @property
    def text_datamodule(self) -> TextDataModule | None:
        return self.datamodule if isinstance(self.datamodule, TextDataModule) else None


class ExportCLI(CheckpointCLI):
    """``lightning-peft export``: rebuild the model from the config, load a checkpoint, write an HF export."""

    ckpt_help = "checkpoint to export (a file, or best / last in checkpoint.dirpath)"
    overwrite_help = "replace --export_dir even if it is not an earlier export (default: refuse)"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--export_dir", type=str, required=True,
            help="directory to write: adapter/, merged/ with --merge, README.md (an earlier export there is replaced "
            "atomically; anything else is refused without --overwrite)",
        )
        parser.add_argument("--merge", type=bool, default=False, help="also write merged/, a full transformers model")
        parser.add_argument("--quantize", type=str | None, default=None,
                            help="also write int8/: merged/ with dynamic int8 linear layers (torchao), and with --onnx "
                            "onnx/model_quantized.onnx (onnxruntime); encoder tasks")
        parser.add_argument("--onnx", type=bool, default=False,
                            help="also write onnx/model.onnx (torch.onnx, run by onnxruntime); encoder tasks")
        parser.add_argument("--push_to_hub", type=str | None, default=None,
                            help="then upload the export to this Hub repo id (created if needed): the adapter at its "
                            "root, merged/ beside it, the model card as README.md")
        parser.add_argument("--private", type=bool | None, default=None, help="create the --push_to_hub repo private")

    def before_instantiate_classes(self) -> None:
        """Refuse an unknown ``--quantize`` or a missing backend before the model loads."""
        super().before_instantiate_classes()
        config = self.config.get(str(self.subcommand), self.config)
        check_compression_available(config.get("quantize"), bool(config.get("onnx")))

    def run_export(self) -> tuple[Path, str | None]:
        """What :class:`~lightning_peft.callbacks.AdapterExport` writes at fit end, from ``--ckpt_path``; then the
        upload, with ``--push_to_hub`` (its commit URL, else ``None``)."""
        datamodule = self.text_datamodule
        directory = export_checkpoint(
            self.model, self.config["ckpt_path"], self.config["export_dir"],
            tokenizer=datamodule.tokenizer if datamodule else None, merge=self.config["merge"],
            data=datamodule.card_facts() if datamodule else None, overwrite=self.config["overwrite"],
            quantize=self.config["quantize"], onnx=self.config["onnx"],
        )
        repo_id = self.config["push_to_hub"]
        return directory, push_export(directory, repo_id, self.config["private"]) if repo_id else None


class ExplainCLI(CheckpointCLI):
    """``lightning-peft explain``: rebuild the model from the config, load a checkpoint, attribute one input."""

    ckpt_help = "checkpoint whose model to explain (a file, or best / last in checkpoint.dirpath)"

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


#: where Lightning's own code lives
LIGHTNING_SOURCE = os.path.dirname(lightning.__file__) + os.sep


def _trainer_error(err: BaseException) -> str | None:
    """``trainer: <message>`` for a check Lightning itself raised against the trainer's settings — some run only
    once the data is set up, at fit start (``val_check_interval`` beyond an epoch's batches) — or ``None`` for an
    error raised in code Lightning called."""
    if not isinstance(err, (ValueError, MisconfigurationException)):
        return None
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None or not frame.tb_frame.f_code.co_filename.startswith(LIGHTNING_SOURCE):
        return None
    return f"trainer: {' '.join(str(err).split())}"


#: exit status of a fit stopped by Ctrl-C or SIGTERM (128 + SIGTERM, as a shell reports a terminated process)
STOPPED_BY_SIGNAL = 143
#: OS errors that are the machine's or the user's paths, not a bug: reported as one line
USER_OS_ERRORS = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EDQUOT}


def main(args: list[str] | None = None) -> None:
    """Console entry point: user errors become one ``error:`` line and exit status 2."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] == "export":
            directory, pushed = standalone(ExportCLI, argv[1:]).run_export()
            print(f"exported to {directory}" + (f"; pushed: {pushed}" if pushed else ""))
        elif argv and argv[0] == "explain":
            html_path, json_path = standalone(ExplainCLI, argv[1:]).run_explain()
            print(f"explanation written to {html_path} and {json_path}")
        elif argv and argv[0] == "sweep":
            sweep_main(argv[1:], parse_fit_config)
        elif argv and argv[0] == "convert-gguf":
            convert_main(argv[1:])
        elif argv and argv[0] == "serve":
            from lightning_peft.serve.server import serve_main  # litserve is the `serve` extra

            serve_main(argv[1:])
        else:
            LightningPeftCLI(args=args)
    except argparse.ArgumentError as err:
        print(f"error: {describe_parse_error(str(err), argv[:1])}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:
        sys.exit(STOPPED_BY_SIGNAL)  # RunCheckpoint has written last.ckpt and said how to resume
    except Exception as err:
        user_error = _user_error(err) or _trainer_error(err)
        if user_error is None and isinstance(err, OSError) and err.errno in USER_OS_ERRORS:
            user_error = f"{err.strerror}: {err.filename or ''}; free space, fix the permissions or choose another path"
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
