"""GGUF checkpoints: where their tokenizer comes from, the flags dropped after de-quantisation, the convert command's
errors. The conversion itself runs on the packaged SmolLM2 in `make install`, which the shipped decoder config and
tests/tasks/test_causal_lm.py then use."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_peft.backbone import BackboneConfig, tokenizer_source
from lightning_peft.cli import main
from lightning_peft.quantization import dequantized


def test_a_gguf_backbone_reads_its_tokenizer_from_the_file_unless_given():
    spec = BackboneConfig("models/smol", gguf_file="smol.Q4_1.gguf")
    assert spec.tokenizer_name_or_path == "models/smol/smol.Q4_1.gguf"
    assert tokenizer_source("models/smol", "my-tokenizer", "smol.Q4_1.gguf") == "my-tokenizer"
    assert tokenizer_source("models/smol") == "models/smol"


def test_dequantized_drops_the_gguf_flags():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    model.hf_quantizer, model.config.quantization_config = object(), {"quant_method": "gguf"}
    model = dequantized(model)
    assert model.hf_quantizer is None and "quantization_config" not in model.config.to_dict()


@pytest.mark.parametrize(("name", "content", "cause"), [
    ("missing.gguf", None, "does not exist or is not a file"),
    ("model.bin", b"\0" * 8, "is not a .gguf file"),
    ("junk.gguf", b"junk", "does not start with the GGUF magic bytes"),
])
def test_convert_refuses_what_is_not_a_gguf_file(tmp_path, capsys, name, content, cause):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-gguf", "--gguf_file", str(tmp_path / name), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gguf_file: ") and cause in err, err
    assert not (tmp_path / "out").exists()
