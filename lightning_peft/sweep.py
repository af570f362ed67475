"""``lightning-peft sweep``: run a W&B sweep spec (``configs/sweeps/*.yaml``) on this machine, no W&B server.

Each trial is a real ``lightning-peft fit`` in its own process with the trial's values as CLI arguments, exactly what
``wandb agent`` would run; trials that crash are recorded, not fatal. Methods: ``grid`` (every combination of the
``values`` lists), ``random`` and ``bayes`` (optuna's TPE sampler, when optuna is installed).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_peft.adapter_checkpoint import METRICS_KEY
from lightning_peft.checkpoints import load_checkpoint
from lightning_peft.errors import LightningPeftError
from lightning_peft.figures import plotting, save_figure
from lightning_peft.parse_errors import describe_parse_error

#: ``fit`` arguments → (parser, parsed config), nothing built (``lightning_peft.cli.parse_fit_config``)
ConfigParser = Callable[[list[str]], tuple[Any, Any]]


@dataclass
class Trial:
    number: int
    params: dict[str, Any]
    status: str = "not run"
    metric: float | None = None
    seconds: float = 0.0
    error: str = ""
    learning_rate: float | None = None  # the rate it trained with (the one training.lr: auto found)


@dataclass
class SweepSpec:
    """The parts of a W&B sweep spec a local run needs."""

    path: Path
    method: str
    metric: str
    goal: str
    parameters: dict[str, dict[str, Any]]
    fit_args: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> SweepSpec:
        where = f"sweep spec {str(path)!r}"
        try:
            spec = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise LightningPeftError(f"{where}: cannot read it ({err})") from err
        if not isinstance(spec, dict):
            raise LightningPeftError(f"{where}: must be a YAML mapping (program, method, metric, parameters, "
                                     f"command), got {type(spec).__name__}")
        command = spec.get("command") or []
        if not isinstance(command, list) or command[:3] != ["${env}", "lightning-peft", "fit"] \
                or command[-1:] != ["${args}"]:
            raise LightningPeftError(f"{where}: command must be [${{env}}, lightning-peft, fit, …, ${{args}}]")
        metric = spec.get("metric") or {}
        if not isinstance(metric, dict) or "name" not in metric:
            raise LightningPeftError(f"{where}: metric.name is missing")
        goal = metric.get("goal", "maximize")
        if goal not in GOALS:
            raise LightningPeftError(f"{where}: metric.goal must be one of {', '.join(GOALS)}, got {goal!r}")
        parameters = spec.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise LightningPeftError(f"{where}: parameters must map each fit option to its values, got "
                                     f"{type(parameters).__name__}")
        checked = {name: checked_parameter(f"{where}: parameters.{name}", parameter)
                   for name, parameter in parameters.items()}
        return cls(path, spec.get("method", "random"), metric["name"], goal, checked, command[3:-1])

    def candidate_values(self) -> dict[str, list[Any]]:
        """Each parameter's values a trial can get, or its range's two ends: what the CLI must accept."""
        return {name: [p["value"]] if "value" in p else p.get("values") or [p["min"], p["max"]]
                for name, p in self.parameters.items()}


#: W&B's metric goals
GOALS = ("maximize", "minimize")
#: the W&B distributions a local sweep draws from
DISTRIBUTIONS = ("int_uniform", "uniform", "log_uniform_values")


def checked_parameter(where: str, parameter: Any) -> dict[str, Any]:
    """A W&B sweep parameter (``value``, non-empty ``values``, or ``min`` < ``max`` with a supported
    ``distribution``) with its distribution filled in, or one error naming ``where``. ``min: 1e-3`` is a string to
    YAML 1.1 (no dot), and is read as the number it is meant to be."""
    if not isinstance(parameter, dict):
        raise LightningPeftError(f"{where}: give {{value: …}}, {{values: […]}} or {{min: …, max: …}}, got "
                                 f"{parameter!r}")
    if "value" in parameter:
        return parameter
    if "values" in parameter:
        if not isinstance(parameter["values"], list) or not parameter["values"]:
            raise LightningPeftError(f"{where}.values: must be a non-empty list, got {parameter['values']!r}")
        return parameter
    if "min" not in parameter or "max" not in parameter:
        raise LightningPeftError(f"{where}: give value, values, or both min and max")
    low, high = (_number(f"{where}.{end}", parameter[end]) for end in ("min", "max"))
    distribution = parameter.get("distribution") or ("int_uniform" if isinstance(low, int) else "uniform")
    if distribution not in DISTRIBUTIONS:
        raise LightningPeftError(f"{where}.distribution: {distribution!r} is not supported locally; use one of "
                                 f"{', '.join(DISTRIBUTIONS)}")
    if not low < high:
        raise LightningPeftError(f"{where}: min must be below max, got {low} and {high}")
    if distribution == "log_uniform_values" and low <= 0:
        raise LightningPeftError(f"{where}.min: log_uniform_values draws on a log scale, so min must be > 0, got {low}")
    if distribution == "int_uniform" and not (isinstance(low, int) and isinstance(high, int)):
        raise LightningPeftError(f"{where}: int_uniform needs integer min and max, got {low} and {high}")
    return {**parameter, "min": low, "max": high, "distribution": distribution}


def _number(where: str, value: Any) -> int | float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LightningPeftError(f"{where}: must be a number, got {value!r}") from None


Suggest = Callable[[str, dict[str, Any]], Any]


def draw(name: str, spec: dict[str, Any], sampler: Any) -> Any:
    """One value of a W&B sweep parameter: its ``value``, one of its ``values``, or a draw from its ``distribution``
    over ``min``–``max`` (integers default to ``int_uniform``, others to ``uniform``), made by ``sampler``'s
    ``categorical(name, values)``, ``integer(name, low, high)`` or ``real(name, low, high, log)``; ``spec`` is
    checked (and its distribution filled in) by :func:`checked_parameter`."""
    spec = checked_parameter(f"sweep parameter {name}", spec)
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return sampler.categorical(name, spec["values"])
    if spec["distribution"] == "int_uniform":
        return sampler.integer(name, spec["min"], spec["max"])
    return sampler.real(name, spec["min"], spec["max"], log=spec["distribution"] == "log_uniform_values")


@dataclass
class _RandomSampler:
    rng: random.Random

    def categorical(self, name: str, values: list[Any]) -> Any:
        return self.rng.choice(values)

    def integer(self, name: str, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def real(self, name: str, low: float, high: float, log: bool) -> float:
        return math.exp(self.rng.uniform(math.log(low), math.log(high))) if log else self.rng.uniform(low, high)


@dataclass
class _OptunaSampler:
    trial: Any

    def categorical(self, name: str, values: list[Any]) -> Any:
        return self.trial.suggest_categorical(name, values)

    def integer(self, name: str, low: int, high: int) -> int:
        return self.trial.suggest_int(name, low, high)

    def real(self, name: str, low: float, high: float, log: bool) -> float:
        return self.trial.suggest_float(name, low, high, log=log)


def random_suggest(rng: random.Random) -> Suggest:
    """Draw parameters as W&B's random search does."""
    sampler = _RandomSampler(rng)
    return lambda name, spec: draw(name, spec, sampler)


def optuna_suggest(trial: Any) -> Suggest:
    """Draw parameters through an optuna trial (TPE: Bayesian search)."""
    sampler = _OptunaSampler(trial)
    return lambda name, spec: draw(name, spec, sampler)


def grid(parameters: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every combination of the parameters' ``values`` (W&B's grid method)."""
    choices = {}
    for name, spec in parameters.items():
        if "values" not in spec and "value" not in spec:
            raise LightningPeftError(f"sweep parameter {name}: grid search needs a values list, not a distribution")
        choices[name] = spec.get("values", [spec.get("value")])
    return [dict(zip(choices, combo, strict=True)) for combo in itertools.product(*choices.values())]


class LocalSweep:
    """Runs a sweep spec's trials one after another and reports them.

    Example::

        from lightning_peft.cli import parse_fit_config

        spec = SweepSpec.load(Path("configs/sweeps/quickstart.yaml"))
        LocalSweep(spec, trials=2, out=Path("runs/sweep"), parse_config=parse_fit_config).run()

    ``parse_config`` turns ``fit`` arguments into (parser, config) without building anything; the CLI passes its
    own, so this module never imports the CLI that runs it.
    """

    def __init__(self, spec: SweepSpec, trials: int, out: Path, parse_config: ConfigParser, method: str | None = None,
                 seed: int = 0, overwrite: bool = False) -> None:
        self.spec = spec
        self.trials = trials
        self.out = out
        self.overwrite = overwrite
        self.method = method or spec.method
        self.seed = seed
        if self.method not in ("grid", "random", "bayes"):
            where = "--method" if method else f"sweep spec {str(spec.path)!r}: method"
            raise LightningPeftError(f"{where}: {self.method!r} is not one of grid, random, bayes")
        self.parse_config = parse_config
        _, self.base_config = parse_config(spec.fit_args)
        self.check_values()

    def check_values(self) -> None:
        """Parse the spec's arguments with each value a trial can get (a range's two ends), so that a misspelt
        option or a value of the wrong type is one error before any trial, not a sweep of failed trials."""
        for name, values in self.spec.candidate_values().items():
            for value in values:
                try:
                    self.parse_config([*self.spec.fit_args, f"--{name}={value}"])
                except argparse.ArgumentError as err:
                    raise LightningPeftError(
                        f"sweep spec {str(self.spec.path)!r}: parameters.{name} = {value!r}: "
                        f"{describe_parse_error(str(err), ['fit'])}"
                    ) from err

    @property
    def maximise(self) -> bool:
        return self.spec.goal == "maximize"

    #: what a sweep writes in its output directory, besides the trial directories
    REPORT_FILES = ("results.csv", "best.yaml", "metric_vs_parameters.png")

    def earlier_outputs(self) -> list[Path]:
        """What an earlier sweep left in :attr:`out`: its trial directories and report files."""
        if not self.out.is_dir():
            return []
        trials = [p for p in self.out.glob("trial-[0-9][0-9][0-9]") if p.is_dir()]
        return sorted(trials) + [self.out / name for name in self.REPORT_FILES if (self.out / name).exists()]

    def claim_output(self) -> None:
        """Refuse to mix this sweep's trials with an earlier sweep's (a trial would report the old run's metric
        and ``best.yaml`` would be built on it), or, with ``overwrite``, remove what that sweep wrote (and only
        that)."""
        earlier = self.earlier_outputs()
        if earlier and not self.overwrite:
            names = ", ".join(p.name for p in earlier[:3]) + (", …" if len(earlier) > 3 else "")
            raise LightningPeftError(
                f"--out: {str(self.out)!r} holds an earlier sweep ({names}); choose another --out, or pass "
                "--overwrite true to replace it"
            )
        for path in earlier:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.out.mkdir(parents=True, exist_ok=True)

    def run(self) -> list[Trial]:
        self.claim_output()
        if self.method == "grid":
            trials = [self.run_trial(k, params) for k, params in enumerate(grid(self.spec.parameters)[: self.trials])]
        elif self.method == "random":
            rng = random.Random(self.seed)
            trials = []
            for k in range(self.trials):
                params = {name: random_suggest(rng)(name, spec) for name, spec in self.spec.parameters.items()}
                trials.append(self.run_trial(k, params))
        else:
            trials = self._run_bayes()
        self.report(trials)
        return trials

    def _run_bayes(self) -> list[Trial]:
        try:
            import optuna
        except ImportError as err:
            raise LightningPeftError("--method bayes needs optuna: pip install optuna (or use random)") from err
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize" if self.maximise else "minimize",
                                    sampler=optuna.samplers.TPESampler(seed=self.seed))
        trials = []
        for k in range(self.trials):
            asked = study.ask()
            suggest = optuna_suggest(asked)
            trial = self.run_trial(k, {name: suggest(name, spec) for name, spec in self.spec.parameters.items()})
            state = optuna.trial.TrialState.COMPLETE if trial.metric is not None else optuna.trial.TrialState.FAIL
            study.tell(asked, trial.metric if trial.metric is not None else None, state=state)
            trials.append(trial)
        return trials

    # -- one trial ----------------------------------------------------------------------------------------
    def trial_directory(self, number: int) -> Path:
        return self.out / f"trial-{number:03d}"

    def trial_command(self, number: int, params: dict[str, Any]) -> list[str]:
        """``lightning-peft fit`` with the spec's arguments, the trial's values, and its own output directories."""
        directory = self.trial_directory(number)
        command = [sys.executable, "-m", "lightning_peft.cli", "fit", *self.spec.fit_args]
        command += [f"--{name}={value}" for name, value in params.items()]
        command += ["--trainer.default_root_dir", str(directory)]
        command += ["--checkpoint.dirpath", str(directory / "checkpoints")]
        logger = self.base_config.get("trainer", {}).get("logger")
        if isinstance(logger, dict) or hasattr(logger, "init_args"):
            command += ["--trainer.logger.init_args.save_dir", str(directory)]
        return command

    def run_trial(self, number: int, params: dict[str, Any]) -> Trial:
        trial = Trial(number, params)
        print(f"trial {number}: {format_params(params)}", flush=True)
        env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        start, started_at = time.perf_counter(), time.time()
        done = subprocess.run(self.trial_command(number, params), capture_output=True, text=True, env=env)
        trial.seconds = time.perf_counter() - start
        self.trial_directory(number).mkdir(parents=True, exist_ok=True)
        (self.trial_directory(number) / "output.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            trial.status, trial.error = f"failed (exit {done.returncode})", lines[-1] if lines else ""
            print(f"  {trial.status}: {trial.error}", flush=True)
            return trial
        checkpoint = self.read_checkpoint(number, started_at)
        metric = checkpoint.get(METRICS_KEY, {}).get(self.spec.metric)
        trial.metric = None if metric is None else float(metric)
        trial.learning_rate = trained_learning_rate(checkpoint)
        trial.status = "done" if trial.metric is not None else f"done, no {self.spec.metric}"
        print(f"  {self.spec.metric} = {trial.metric}" + (f" (lr {trial.learning_rate:g})"
                                                            if trial.learning_rate is not None else ""), flush=True)
        return trial

    def read_checkpoint(self, number: int, started_at: float) -> dict[str, Any]:
        """The trial's ``last.ckpt``: its validation metrics as logged at the end (as W&B's summary) and its
        hyperparameters with the rate it trained with; empty unless that file was written by this trial (started at
        ``started_at``, a ``time.time()``)."""
        last = self.trial_directory(number) / "checkpoints" / "last.ckpt"
        if not last.is_file() or last.stat().st_mtime < started_at:
            return {}
        return load_checkpoint(last, f"trial {number} checkpoint")

    # -- results ------------------------------------------------------------------------------------------
    def best(self, trials: list[Trial]) -> Trial | None:
        scored = [t for t in trials if t.metric is not None]
        if not scored:
            return None
        return (max if self.maximise else min)(scored, key=lambda t: t.metric)

    def report(self, trials: list[Trial]) -> None:
        names = list(self.spec.parameters)
        with open(self.out / "results.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["trial", *names, self.spec.metric, "learning_rate", "status", "seconds", "error"])
            for t in trials:
                writer.writerow([t.number, *(t.params.get(n) for n in names), t.metric, t.learning_rate, t.status,
                                 f"{t.seconds:.1f}", t.error])
        print(f"\n{'trial':>5}  {self.spec.metric:>14}  {'status':<18} parameters")
        for t in trials:
            metric = "-" if t.metric is None else f"{t.metric:.4f}"
            print(f"{t.number:>5}  {metric:>14}  {t.status:<18} {format_params(t.params)}")
        best = self.best(trials)
        if best is None:
            print("\nno trial produced the metric; see output.log in each trial directory")
            return
        best_args = [*self.spec.fit_args, *(f"--{n}={v}" for n, v in best.params.items())]
        parser, config = self.parse_config(best_args)
        config.pop("config", None)
        (self.out / "best.yaml").write_text(parser.dump(config, skip_none=False))
        best_yaml = self.out / "best.yaml"
        print(f"\nbest: trial {best.number}, {self.spec.metric} = {best.metric:.4f}; its config: {best_yaml} "
              f"(lightning-peft fit --config {best_yaml})")
        self.plot(trials)

    def plot(self, trials: list[Trial]) -> None:
        plt = plotting("lightning-peft sweep")
        if plt is None:
            return
        scored = [t for t in trials if t.metric is not None]
        names = list(self.spec.parameters)
        figure, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
        for axis, name in zip(axes[0], names, strict=True):
            values = [t.params[name] for t in scored]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            positions = values if numeric else [str(v) for v in values]
            axis.scatter(positions, [t.metric for t in scored])
            if numeric and self.spec.parameters[name].get("distribution") == "log_uniform_values":
                axis.set_xscale("log")
            axis.set_xlabel(name.rsplit(".", 1)[-1])
            axis.tick_params(axis="x", labelrotation=45 if not numeric else 0, labelsize=7)
        axes[0][0].set_ylabel(self.spec.metric)
        print(f"plot: {save_figure(None, figure, self.out / 'metric_vs_parameters.png', 'sweep')}")


def trained_learning_rate(checkpoint: dict[str, Any]) -> float | None:
    """The rate a lightning-peft checkpoint's fit trained with (``hyper_parameters.training.lr``: the one given, the
    method's default, or the one ``training.lr: auto`` found); ``None`` where a module keeps no such number."""
    training = (checkpoint.get("hyper_parameters") or {}).get("training")
    lr = training.get("lr") if isinstance(training, dict) else None
    return float(lr) if isinstance(lr, int | float) and not isinstance(lr, bool) else None


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{n.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{n.rsplit('.', 1)[-1]}={v}"
                     for n, v in params.items())


def sweep_main(argv: list[str], parse_config: ConfigParser) -> None:
    """``lightning-peft sweep SPEC --trials N [--method grid|random|bayes] [--out DIR] [--seed S]``."""
    parser = argparse.ArgumentParser(prog="lightning-peft sweep", description=__doc__)
    parser.add_argument("spec", type=Path, help="a W&B sweep spec, e.g. configs/sweeps/quickstart.yaml")
    parser.add_argument("--trials", type=int, default=4, help="how many trials (grid: at most this many)")
    parser.add_argument("--method", choices=("grid", "random", "bayes"), default=None, help="default: the spec's")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/sweeps/<spec name>")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random / bayes search")
    parser.add_argument("--overwrite", choices=("true", "false"), default="false",
                        help="replace an earlier sweep's trials and report in --out (default: refuse)")
    args = parser.parse_args(argv)
    if args.trials < 1:
        raise LightningPeftError(f"--trials: must be at least 1, got {args.trials}")
    spec = SweepSpec.load(args.spec)
    out = args.out or Path("runs") / "sweeps" / args.spec.stem
    LocalSweep(spec, args.trials, out, parse_config, args.method, args.seed, overwrite=args.overwrite == "true").run()
