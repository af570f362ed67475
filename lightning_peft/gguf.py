"""``lightning-peft convert-gguf``: a GGUF checkpoint written once as a plain safetensors model directory.

``backbone.gguf_file`` loads a GGUF file directly (see :func:`lightning_peft.quantization.dequantized`), but converts
every tensor on each load (about 30 s for a 135M model on 2 cores); configs should point at a directory written
once by :func:`convert_gguf`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_peft.backbone import is_gguf_path, split_gguf_path
from lightning_peft.errors import LightningPeftError
from lightning_peft.export import atomic_directory
from lightning_peft.quantization import dequantized


def convert_gguf(gguf_path: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the causal LM in the GGUF file ``gguf_path`` as a float32 safetensors model directory with its tokenizer
    (chat template included) and generation config; ``output_dir`` is replaced atomically (refused if it holds other
    files, unless ``overwrite``).

    Example::

        convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/SmolLM2-135M-Instruct")
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise LightningPeftError(f"gguf_file: {str(gguf_path)!r} does not exist or is not a file")
    if not is_gguf_path(str(gguf_path)):
        raise LightningPeftError(f"gguf_file: {str(gguf_path)!r} is not a .gguf file")
    directory, name = split_gguf_path(gguf_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise LightningPeftError(f"gguf_file: transformers cannot read {str(gguf_path)!r} ({err})") from err
    model = dequantized(model)
    with atomic_directory(output_dir, "output_dir", overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(output_dir)


def convert_main(argv: list[str]) -> None:
    """``lightning-peft convert-gguf --gguf_file F --output_dir D [--overwrite true]``."""
    parser = argparse.ArgumentParser(prog="lightning-peft convert-gguf", description=convert_gguf.__doc__,
                                     exit_on_error=False)
    parser.add_argument("--gguf_file", required=True, help="the .gguf file to convert")
    parser.add_argument("--output_dir", required=True, help="the model directory to write")
    parser.add_argument("--overwrite", type=lambda s: s.lower() in ("1", "true", "yes"), default=False,
                        help="replace output_dir even if it holds other files")
    args = parser.parse_args(argv)
    print(f"converted to {convert_gguf(args.gguf_file, args.output_dir, args.overwrite)}")
