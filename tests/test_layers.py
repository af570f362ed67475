"""The package's layers: what importing one part loads, and which parts import which."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lightning_peft

PACKAGE = Path(lightning_peft.__file__).parent
#: each part of the package and its layer: a module may import its own layer or lower ones, never higher
#: (docs/architecture.md draws the same table)
LAYERS = {
    "errors": 0, "types": 0,
    "training": 1, "regularization": 1, "packing": 1, "metrics": 1, "encoder_decoder": 1, "backbone": 1,
    "checkpoints": 1, "adapter_checkpoint": 1, "model_card": 1, "export": 1, "calibration": 1, "uncertainty": 1,
    "figures": 1, "parse_errors": 1, "strategies": 1, "gguf": 1, "quantization": 1, "learning_rate_search": 1,
    "compressed": 1,
    "batching": 2, "data": 2,
    "tasks": 3,
    "callbacks": 4, "explain": 4,
    "sweep": 5, "serve": 5,
    "cli": 6,
}


def part(module: str) -> str:
    """``lightning_peft.tasks.base`` → ``tasks``."""
    return module.split(".")[1]


def runtime_imports() -> set[tuple[str, str]]:
    """(importing part, imported part) for every import of lightning_peft inside the package, lazy ones included and
    ``if TYPE_CHECKING:`` blocks left out; the package's own ``__init__`` (a lazy facade) is not a part."""
    edges = set()
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "__init__.py":
            continue
        source = part(".".join(("lightning_peft", *path.relative_to(PACKAGE).with_suffix("").parts)))
        tree = ast.parse(path.read_text())
        checking_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                         and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_peft."):
                names = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.module == "lightning_peft":
                names = [f"lightning_peft.{alias.name}" for alias in node.names]
            else:
                continue
            edges |= {(source, part(name)) for name in names if id(node) not in checking_only}
    return {(a, b) for a, b in edges if a != b}


def test_every_public_name_resolves_lazily():
    assert lightning_peft.__all__ == sorted(lightning_peft._EXPORTS)
    for name in lightning_peft.__all__:
        assert getattr(lightning_peft, name).__name__ == name


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(m for m in sys.modules if m.startswith('lightning_peft')))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_importing_a_lower_layer_does_not_load_the_tasks_or_the_cli():
    for statement in ("import lightning_peft.data", "from lightning_peft import TrainingConfig"):
        loaded = loaded_after(statement)
        assert not {m for m in loaded if m.startswith(("lightning_peft.tasks", "lightning_peft.cli",
                                                      "lightning_peft.callbacks"))}, statement


def test_every_part_has_a_layer_and_imports_only_down():
    edges = runtime_imports()
    parts = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()
             if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").is_file()}
    assert parts == set(LAYERS), "a new module needs its layer in LAYERS (and in docs/architecture.md)"
    upward = sorted((a, b) for a, b in edges if LAYERS[a] < LAYERS[b])
    assert not upward, f"imports that point up: {upward}"
    same_layer = {(a, b) for a, b in edges if LAYERS[a] == LAYERS[b]}
    assert not {(a, b) for a, b in same_layer if (b, a) in same_layer}, "an import cycle"
