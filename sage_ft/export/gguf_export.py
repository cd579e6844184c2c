"""GGUF export (llama.cpp / Ollama / LM Studio format) for Llama- and Qwen2-family models.

We write the file with the ``gguf`` package's ``GGUFWriter`` directly instead of shelling out to
llama.cpp's ``convert_hf_to_gguf.py`` (not installable from PyPI). What the converter does for these
two families, and what we reproduce (keys and layout from llama.cpp's convert_hf_to_gguf.py):
- tensor names from ``gguf.get_tensor_name_map``; Llama's q/k projections are permuted from the HF
  rotary layout (halves) to GGML's interleaved one (Qwen2 uses NEOX rope: no permutation);
- 1-D tensors (norms, biases) stay F32; matrices become F16 / BF16 / Q8_0;
- the byte-level BPE vocabulary: tokens, token types (special added tokens are CONTROL), merges,
  special token ids, the ``tokenizer.ggml.pre`` name of the split regex, and the chat template.
Tensors are converted and written one at a time (tensor infos first, then data), so memory stays at
one tensor, not one model. The file is verified by loading it back with transformers' GGUF loader.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_ft import paths
from sage_ft.export.source import EXPORT_RECORD, ExportCancelled, ExportError, read_json
from sage_ft.export.verify import VerifyResult, compare_logits, prompt_logits, render_prompts

log = logging.getLogger(__name__)

# HF architecture -> gguf architecture name
SUPPORTED_GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
GGUF_OUTTYPES = ("f16", "bf16", "q8_0")
# max |logit diff| allowed vs the float32 source, as a fraction of max(1, max |logit|)
GGUF_RELATIVE_TOLERANCE = {"f16": 1e-2, "bf16": 6e-2, "q8_0": 8e-2}
_GPT2_STYLE = "gpt-2"  # plain ByteLevel pre-tokenizer with GPT-2's own split regex


class GGUFVerifyError(ExportError):
    """The written GGUF does not reproduce the source model; the file was removed."""

    def __init__(self, message: str, result: VerifyResult):
        super().__init__(message)
        self.result = result


@dataclass
class _TensorPlan:
    hf_name: str
    gguf_name: str
    file: Path
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType


def _ftype(outtype: str):
    import gguf

    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def _matrix_qtype(outtype: str, shape: tuple[int, ...]):
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return Q.F32
    if outtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
        return Q.Q8_0 if shape[-1] % block == 0 else Q.F16  # what llama.cpp falls back to as well
    return {"f16": Q.F16, "bf16": Q.BF16}[outtype]


def check_convertible(model_dir: Path) -> tuple[dict[str, Any], str]:
    """The model's config and its gguf architecture, or an ExportError saying why it cannot be converted."""
    config = read_json(model_dir / "config.json")
    archs = config.get("architectures") or [f"<none; model_type {config.get('model_type')!r}>"]
    arch = archs[0]
    supported = ", ".join(f"{hf} ({g})" for hf, g in SUPPORTED_GGUF_ARCHITECTURES.items())
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ExportError(f"GGUF export does not support architecture {arch} (from {model_dir / 'config.json'}); "
                          f"supported: {supported}. The merged safetensors export works for any model.")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise ExportError(f"GGUF export does not support rope scaling {rope_type!r} (in {model_dir / 'config.json'}) "
                          "yet; only models with plain RoPE can be converted")
    return config, SUPPORTED_GGUF_ARCHITECTURES[arch]


def _rope_theta(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)


def _pre_tokenizer_name(tokenizer_json: dict[str, Any], where: Path) -> str:
    """llama.cpp's name for how text is split before BPE (``tokenizer.ggml.pre``)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return _GPT2_STYLE
    if pre.get("type") == "Sequence":
        for step in pre.get("pretokenizers", []):
            pattern = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
            if pattern is None:
                continue
            for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
                if split == pattern:
                    return name
    raise ExportError(f"GGUF export cannot name the pre-tokenizer of {where} ({json.dumps(pre)[:200]}); "
                      "only GPT-2, Llama-3 and Qwen2 style byte-level BPE tokenizers are supported")


def _add_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    import gguf
    from transformers import AutoTokenizer

    tok_file = model_dir / "tokenizer.json"
    if not tok_file.exists():
        raise ExportError(f"GGUF export needs a fast tokenizer file: {tok_file} is missing")
    tokenizer_json = read_json(tok_file)
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export supports byte-level BPE tokenizers; {tok_file} has {model.get('type')!r}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer in {model_dir} has ids up to {max(by_id)} but the model's vocab_size is "
                          f"{vocab_size}; the embedding must cover every token")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer_json, tok_file))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _add_hparams(writer, config: dict[str, Any], arch: str, outtype: str, name: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(_ftype(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _plan_tensors(model_dir: Path, config: dict[str, Any], arch: str, outtype: str) -> list[_TensorPlan]:
    import gguf
    from safetensors import safe_open

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings", False))
    plans = []
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as st:
            for hf_name in st.keys():
                if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                    continue
                gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ExportError(f"GGUF export cannot map tensor {hf_name!r} of {file} to a {arch} GGUF "
                                      "tensor; the model has layers this converter does not know")
                shape = tuple(st.get_slice(hf_name).get_shape())
                plans.append(_TensorPlan(hf_name, gguf_name, file, shape, _matrix_qtype(outtype, shape)))
    if not plans:
        raise ExportError(f"{model_dir} has no *.safetensors weights to convert")
    return plans


def _permute_qk(weights, n_head: int, n_head_kv: int | None):
    """HF rotary layout -> GGML's (llama.cpp convert_hf_to_gguf.py LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensor_data(plan: _TensorPlan, config: dict[str, Any], arch: str, handles: dict[Path, Any]):
    import gguf

    data = handles[plan.file].get_tensor(plan.hf_name).float().numpy()
    if arch == "llama" and plan.hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config["num_attention_heads"]
        kv = heads if plan.hf_name.endswith("q_proj.weight") else config.get("num_key_value_heads") or heads
        data = _permute_qk(data, heads, kv)
    return gguf.quants.quantize(data, plan.qtype)


def _nbytes(plan: _TensorPlan) -> tuple[tuple[int, ...], int, Any]:
    """(shape to declare, byte count, numpy dtype) for a planned tensor."""
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    count = 1
    for dim in plan.shape:
        count *= dim
    if plan.qtype == Q.F32:
        return plan.shape, count * 4, np.float32
    if plan.qtype == Q.F16:
        return plan.shape, count * 2, np.float16
    byte_shape = gguf.quant_shape_to_byte_shape(plan.shape, plan.qtype)
    size = 1
    for dim in byte_shape:
        size *= dim
    return byte_shape, size, np.uint8


def default_gguf_path(model_dir: Path, outtype: str) -> Path:
    """In a ``gguf/`` folder of a sage-ft export (one download holds both; vLLM and transformers ignore
    sub-folders of a model dir, and the folder keeps the export's tokenizer files from mixing into a
    transformers load of the GGUF), else beside the exports."""
    if (model_dir / EXPORT_RECORD).exists():
        return model_dir / "gguf" / f"{model_dir.name}-{outtype}.gguf"
    return paths.exports_dir() / f"{model_dir.name}-{outtype}.gguf"


@dataclass
class GGUFExport:
    """What ``convert_to_gguf`` wrote; ``verify`` is None when verification was skipped."""

    path: Path
    outtype: str
    size_bytes: int
    verify: VerifyResult | None


def export_gguf(model_dir: str | Path, out_file: str | Path | None = None, outtype: str = "f16",
                verify: bool = True, overwrite: bool = False, atol: float | None = None,
                progress: Callable[[str, float], None] | None = None,
                cancel_event: threading.Event | None = None) -> Path:
    """``convert_to_gguf(...).path``: the GGUF file written (and verified unless ``verify=False``)."""
    return convert_to_gguf(model_dir, out_file, outtype, verify, overwrite, atol, progress, cancel_event).path


def _check_cancel(cancel_event: threading.Event | None, stage: str) -> None:
    if cancel_event is not None and cancel_event.is_set():
        raise ExportCancelled(f"GGUF export cancelled while {stage}; no GGUF file was written")


def convert_to_gguf(model_dir: str | Path, out_file: str | Path | None = None, outtype: str = "f16",
                    verify: bool = True, overwrite: bool = False, atol: float | None = None,
                    progress: Callable[[str, float], None] | None = None,
                    cancel_event: threading.Event | None = None) -> GGUFExport:
    """Convert a Hugging Face Llama/Qwen2 model directory (e.g. a merged export) to one GGUF file.

    The file is written under a temporary name beside ``out_file`` and, with ``verify`` (default),
    loaded back with transformers' GGUF loader and its logits and tokenization compared with the
    source before it takes its name: a failing file is deleted and ``GGUFVerifyError`` raised, and
    ``cancel_event`` (checked between tensors and between verification steps) raises
    ``ExportCancelled``; either way nothing is left at ``out_file`` (an existing file there stays as it
    was). When the model dir is a sage-ft export, the file and its verification are recorded in its
    ``sage_ft_export.json``.
    """
    import gguf
    import numpy as np
    from safetensors import safe_open

    model_dir = Path(model_dir).expanduser().resolve()
    if outtype not in GGUF_OUTTYPES:
        raise ExportError(f"GGUF outtype {outtype!r} is not one of {', '.join(GGUF_OUTTYPES)}")
    if not (model_dir / "config.json").exists():
        raise ExportError(f"{model_dir} is not a model directory (no config.json); export a merged model first")
    config, arch = check_convertible(model_dir)
    out = Path(out_file).expanduser().resolve() if out_file else default_gguf_path(model_dir, outtype)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another file or pass overwrite (--overwrite)")
    plans = _plan_tensors(model_dir, config, arch, outtype)

    def report(stage: str, fraction: float) -> None:
        """Progress, then a cancel point (a cancel pressed while it was shown stops the stage it names)."""
        if progress is not None:
            progress(stage, fraction)
        _check_cancel(cancel_event, stage)

    from sage_ft.export.merge import DEFAULT_HEADROOM_BYTES, check_disk_space

    check_disk_space(out, sum(_nbytes(p)[1] for p in plans), DEFAULT_HEADROOM_BYTES)
    report("converting", 0.0)
    made_parent = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = None
    result = None
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _add_hparams(writer, config, arch, outtype, model_dir.name)
        _add_tokenizer(writer, model_dir, config["vocab_size"])
        for plan in plans:
            shape, size, np_dtype = _nbytes(plan)
            raw = plan.qtype if np_dtype is np.uint8 else None
            writer.add_tensor_info(plan.gguf_name, shape, np_dtype, size, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        handles = {f: safe_open(f, framework="pt") for f in {p.file for p in plans}}
        for index, plan in enumerate(plans):
            report("converting", 0.8 * index / len(plans))
            writer.write_tensor_data(_tensor_data(plan, config, arch, handles))
        writer.close()
        if verify:
            report("verifying", 0.85)
            result = verify_gguf(model_dir, tmp, outtype=outtype, atol=atol, cancel_event=cancel_event,
                                 progress=lambda step, f: report(f"verifying ({step})", 0.85 + 0.1 * f))
            result.details["candidate"] = str(out)
            if not result.ok:
                raise GGUFVerifyError(f"the GGUF file did not reproduce {model_dir} (max |logit diff| "
                                      f"{result.max_abs_diff:.3g}, {result.details}); it was not kept", result)
        report("finishing", 0.95)  # the last cancel point: the file takes its name next
        tmp.chmod(0o644)
        tmp.replace(out)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        if made_parent and not out.exists():
            with contextlib.suppress(OSError):
                out.parent.rmdir()  # the gguf/ folder this call made, left empty
    _record_gguf(model_dir, out, outtype, result)
    if progress is not None:
        progress("done", 1.0)
    return GGUFExport(path=out, outtype=outtype, size_bytes=out.stat().st_size, verify=result)


def _record_gguf(model_dir: Path, out: Path, outtype: str, result: VerifyResult | None) -> None:
    record_path = model_dir / EXPORT_RECORD
    if not record_path.exists() or not out.is_relative_to(model_dir):
        return
    record = read_json(record_path)
    relative = str(out.relative_to(model_dir))
    entries = [e for e in record.get("gguf", []) if e.get("file") != relative]
    entries.append({"file": relative, "outtype": outtype, "size_bytes": out.stat().st_size,
                    "verify": result.to_dict() if result else None})
    record["gguf"] = entries
    tmp = record_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    tmp.replace(record_path)


def verify_gguf(model_dir: str | Path, gguf_file: str | Path, outtype: str | None = None,
                prompts: list[str] | None = None, atol: float | None = None,
                cancel_event: threading.Event | None = None,
                progress: Callable[[str, float], None] | None = None) -> VerifyResult:
    """Load ``gguf_file`` with transformers' GGUF loader; compare tokenization and float32 logits.

    ``progress(step, fraction)`` is called before each step; ``cancel_event`` is checked there too.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def step(name: str, fraction: float) -> None:
        if progress is not None:
            progress(name, fraction)
        _check_cancel(cancel_event, f"verifying ({name})")

    model_dir, gguf_file = Path(model_dir), Path(gguf_file).resolve()
    step("loading the source", 0.0)
    source_tok = AutoTokenizer.from_pretrained(model_dir)
    texts = render_prompts(source_tok, prompts)
    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    step("source logits", 0.25)
    reference = prompt_logits(source, source_tok, texts)
    del source
    # Load from a folder holding nothing but the file: transformers lets a tokenizer_config.json next
    # to the GGUF override what the file says, which would hide a defect in the file. The link is
    # named *.gguf whatever the file is called (a file being written has a temporary name).
    step("loading the GGUF file", 0.5)
    with tempfile.TemporaryDirectory(prefix="sage-ft-gguf-verify-") as alone:
        link = gguf_file.name if gguf_file.suffix == ".gguf" else "model.gguf"
        (Path(alone) / link).symlink_to(gguf_file)
        gguf_tok = AutoTokenizer.from_pretrained(alone, gguf_file=link)
        loaded = AutoModelForCausalLM.from_pretrained(alone, gguf_file=link, dtype=torch.float32).eval()
    mismatched = [t for t in texts if source_tok(t, add_special_tokens=False)["input_ids"]
                  != gguf_tok(t, add_special_tokens=False)["input_ids"]]
    step("GGUF logits", 0.75)
    candidate = prompt_logits(loaded, gguf_tok, texts)
    if atol is None and outtype is not None:
        max_ref = max(float(r.abs().max()) for r in reference)
        atol = GGUF_RELATIVE_TOLERANCE[outtype] * max(1.0, max_ref)
    result = compare_logits(reference, candidate, "float32", atol, reference=str(model_dir),
                            candidate=str(gguf_file), outtype=outtype,
                            tokenizer_match=not mismatched,
                            chat_template_match=(gguf_tok.chat_template or None) == (source_tok.chat_template or None))
    if mismatched:
        result.ok = False
        result.details["tokenizer_mismatch_example"] = mismatched[0][:200]
    if not result.details["chat_template_match"]:
        result.ok = False
    if gguf_tok.eos_token != source_tok.eos_token:
        result.ok = False
        result.details["eos_token_mismatch"] = [source_tok.eos_token, gguf_tok.eos_token]
    return result
