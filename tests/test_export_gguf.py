"""GGUF export: files written with gguf's writer, read back by transformers' own GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sage_ft.export import ExportError, convert_to_gguf, export_gguf, verify_gguf
from sage_ft.models.demo import ensure_demo_model

PROMPT = "<|im_start|>user\nHello! How are you?<|im_end|>\n<|im_start|>assistant\n"


def _gguf_logits(gguf_file: Path):
    """Logits straight from transformers' GGUF loader (model and tokenizer from the file alone)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        return tok, model(**tok(PROMPT, return_tensors="pt")).logits[0]


def _hf_logits(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return tok, model(**tok(PROMPT, return_tensors="pt")).logits[0]


@pytest.mark.parametrize("outtype,tolerance", [("f16", 0.01), ("q8_0", 0.1)])
def test_demo_model_round_trips_through_gguf(tmp_path, outtype, tolerance):
    import gguf

    demo = ensure_demo_model()
    out = tmp_path / "alone" / f"demo-{outtype}.gguf"
    result = convert_to_gguf(demo, out_file=out, outtype=outtype)
    assert result.path == out and out.exists() and result.size_bytes == out.stat().st_size
    assert result.verify.ok, result.verify
    assert result.verify.details["tokenizer_match"] and result.verify.details["chat_template_match"]
    assert list(out.parent.iterdir()) == [out]  # no temporary file left beside it

    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "llama"
    expected_type = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    assert {t.tensor_type for t in reader.tensors if t.name == "blk.0.attn_q.weight"} == {expected_type}

    # Independent check, not through verify_gguf: the tokenizer and logits transformers reads back.
    src_tok, src = _hf_logits(demo)
    gguf_tok, got = _gguf_logits(out)
    assert gguf_tok(PROMPT)["input_ids"] == src_tok(PROMPT)["input_ids"]
    assert gguf_tok.chat_template == src_tok.chat_template and gguf_tok.eos_token == "<|im_end|>"
    error = (got - src).abs().max(-1).values
    assert error.max() <= tolerance * max(1.0, float(src.abs().max()))
    # Every next token the source picks clearly (top-1 ahead of top-2 by more than twice the error, so no
    # error that size can swap them) is picked from the GGUF too. The random demo's logits are nearly
    # flat, so a share of agreeing positions (0.9 before) moved with each rebuild of its tokenizer.
    top2 = src.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * error
    assert clear.sum() >= 5, f"only {int(clear.sum())} clear positions: too few for the check to mean anything"
    assert (got.argmax(-1) == src.argmax(-1))[clear].all()


def test_verify_fails_for_a_gguf_of_another_model(tmp_path):
    """verify_gguf is not a rubber stamp: the demo's GGUF does not match a different model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    demo = ensure_demo_model()
    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(demo)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(3.0)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(demo).save_pretrained(other)
    gguf_file = export_gguf(demo, out_file=tmp_path / "g" / "demo.gguf", outtype="f16", verify=False)
    result = verify_gguf(other, gguf_file, outtype="f16")
    assert not result.ok and result.max_abs_diff > result.details["atol"]


def test_qwen2_family_with_tied_embeddings_and_biases(tmp_path):
    """A tiny Qwen2 (q/k/v biases, NEOX rope, tied embeddings) with the demo's tokenizer, in bf16."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    demo = ensure_demo_model()
    tok = AutoTokenizer.from_pretrained(demo)
    qwen_dir = tmp_path / "tiny-qwen2"
    config = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # non-zero biases, so dropping or misplacing them would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(qwen_dir)
    tok.save_pretrained(qwen_dir)

    result = convert_to_gguf(qwen_dir, out_file=tmp_path / "q" / "qwen.gguf", outtype="bf16")
    assert result.verify.ok, result.verify
    import gguf

    reader = gguf.GGUFReader(result.path)
    names = {t.name for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert "blk.0.attn_q.bias" in names and "output.weight" not in names


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=256, n_positions=64)).save_pretrained(gpt2)
    out = tmp_path / "out" / "gpt2.gguf"
    with pytest.raises(ExportError) as err:
        export_gguf(gpt2, out_file=out)
    message = str(err.value)
    assert "GPT2LMHeadModel" in message and "LlamaForCausalLM" in message and "Qwen2ForCausalLM" in message
    assert not out.parent.exists()


def test_existing_file_and_bad_outtype_refused(tmp_path):
    demo = ensure_demo_model()
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="already exists"):
        export_gguf(demo, out_file=taken)
    assert taken.read_bytes() == b"keep me"
    with pytest.raises(ExportError, match="outtype 'q4_k' is not one of f16, bf16, q8_0"):
        export_gguf(demo, out_file=tmp_path / "x.gguf", outtype="q4_k")
    with pytest.raises(ExportError, match="no config.json"):
        export_gguf(tmp_path, out_file=tmp_path / "y.gguf")
    assert json.loads((demo / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
