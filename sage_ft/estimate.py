"""How much memory a LoRA fine-tuning run needs, and which settings make it fit the device.

Everything is computed from the model's ``config.json`` and, when present, the safetensors
*headers* (tensor names, shapes, dtypes — a few KB read from the start of each file): no weights are
loaded and torch is not imported, so the UI can call it on every form change.

The model of memory (bytes; docs/memory_estimator.md derives each term and shows the measurements):

- weights: parameters x bytes of the load dtype. The trainer (``sage_ft.training.engine``) loads
  bf16/fp16 weights on GPU and keeps fp32 weights on CPU with bf16 autocast. With
  ``quantization_bit`` the decoder's linear layers take ``QUANTIZED_BYTES_PER_PARAM`` instead (the
  rest stays in the load dtype) plus one of them dequantized while it computes, and autocast keeps
  no copies of them (bitsandbytes dequantizes again for the backward);
- autocast copies (``autocast_weight_copy_bytes``): the half-precision copies of fp32 weights that
  autocast makes and the backward needs (CPU: every decoder linear and the LoRA matrices);
- LoRA: adapter params are fp32 (peft upcasts them): param + grad + optimizer state (AdamW 8 bytes);
- activations per token and layer (``activation_bytes_per_token_layer``): what autograd saves in a
  Llama-style decoder layer with LoRA on frozen linears, counted tensor by tensor on CPU (the
  norms' fp32 inputs, the outputs LoRA A reads, q/k/v, the attention output and mask, three or four
  MLP intermediates, LoRA A outputs); gradient checkpointing keeps only each layer's input plus one
  layer being recomputed;
- logits: batch x seq x vocab x 12 bytes (+ 2 in half precision): the logits (and their fp32
  upcast), the log-softmax output and the gradient — for small models with big vocabularies this is
  the largest term. On GPUs with liger-kernel the loss is a fused linear cross-entropy over chunks
  of about tokens x hidden / vocab rows, so the term is about tokens x hidden x 12 bytes
  (``sage_ft.gpu.fused_cross_entropy_available`` decides, for the estimate and the trainer alike);
- backward: what one layer's backward holds beyond the loss's buffers, which are freed before it
  starts (with gradient checkpointing: the recomputed layer's activations and weight copies);
- overhead: runtime workspaces (CUDA context + cuBLAS on GPU, allocator and kernels on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_ft.config import TrainConfig
from sage_ft.gpu import fused_cross_entropy_available

GiB = 1024**3
MiB = 1024**2
HEADROOM = 0.85  # use at most this share of the free memory: allocator fragmentation, spikes, the OS
GPU_OVERHEAD = 1.0 * GiB  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack
CPU_OVERHEAD = 140 * MiB  # allocator arenas, library pages, Trainer state: RSS over the pass-time peak (docs)
# On the one H100 run measured (docs/memory_estimator.md) fp32 training needed 12.5 GiB more than
# estimated, 31 % of the activation term, while bf16 needed less; the cause is not found yet
# (bench/saved_activations.py on CUDA will show it). Until then the estimate adds that gap, so that a
# recommendation near the card's limit does not run out of memory.
CUDA_FP32_ACTIVATION_MARGIN = 0.31
MIN_CUTOFF = 128
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_OPTIMIZER_STATE_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "sgd": 0, "adafactor": 4}
# Bytes per weight of a bitsandbytes-quantized linear layer. 4-bit: half a byte plus one fp32 absmax per
# block of 64 weights (1/16 byte), or with double quantization one byte per block and an fp32 constant
# per 256 blocks (~1/63 byte). 8-bit (LLM.int8): one byte plus an fp32 scale per row (negligible).
QUANTIZED_BYTES_PER_PARAM = {(4, False): 0.5 + 4 / 64, (4, True): 0.5 + 1 / 64 + 4 / (64 * 256), (8, False): 1.0,
                             (8, True): 1.0}


class EstimateError(ValueError):
    """The model's shape cannot be read (names the file and what is missing)."""


# ---------------------------------------------------------------------------------------- model facts
@dataclass(frozen=True)
class ModelFacts:
    """The shape numbers the estimate needs, read from config.json (+ safetensors headers)."""

    hidden_size: int
    intermediate_size: int  # per token actually used (MoE: experts per token x expert size)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    n_params: int
    linear_shapes: tuple[tuple[str, int, int], ...]  # (module name, out, in) of adaptable linears
    source: str  # "safetensors headers" or "config.json"
    model_type: str = ""  # config.json's model_type (decides whether the fused loss applies)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


_facts_cache: dict[tuple[str, int], ModelFacts] = {}


def model_facts(model_dir: str | Path) -> ModelFacts:
    """Shape facts of the model in ``model_dir`` (cached per config.json mtime)."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    try:
        stamp = cfg_path.stat().st_mtime_ns
    except OSError:
        raise EstimateError(f"{cfg_path}: not found; the memory estimate needs the model's config.json") from None
    key = (str(model_dir.resolve()), stamp)
    if key not in _facts_cache:
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EstimateError(f"{cfg_path}: unreadable JSON ({exc})") from None
        _facts_cache[key] = _facts_from(cfg, safetensors_tensors(model_dir), str(cfg_path))
    return _facts_cache[key]


def facts_from_config(cfg: dict[str, Any]) -> ModelFacts:
    """Facts from a config dict alone (a model that is not on disk yet, e.g. the unbuilt demo)."""
    return _facts_from(cfg, {}, "config")


def _pick(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def _facts_from(cfg: dict[str, Any], tensors: dict[str, tuple[list[int], str]], where: str) -> ModelFacts:
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers keep the LM shape here
        cfg = {**cfg, **cfg["text_config"]}
    hidden = _pick(cfg, "hidden_size", "n_embd", "d_model")
    layers = _pick(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _pick(cfg, "num_attention_heads", "n_head")
    vocab = _pick(cfg, "vocab_size")
    missing = [n for n, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads), ("vocab_size", vocab)) if not v]
    if missing:
        raise EstimateError(f"{where}: missing {', '.join(missing)}; cannot estimate memory for this model")
    kv_heads = _pick(cfg, "num_key_value_heads", "num_kv_heads", default=heads)
    head_dim = _pick(cfg, "head_dim", default=hidden // heads)
    inter = _pick(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    if cfg.get("num_experts_per_tok") and cfg.get("moe_intermediate_size"):
        inter = cfg["num_experts_per_tok"] * cfg["moe_intermediate_size"]
    if tensors:
        n_params = sum(math.prod(shape) for shape, _ in tensors.values())
        linears = tuple((name[: -len(".weight")], shape[0], shape[1]) for name, (shape, _) in sorted(tensors.items())
                        if len(shape) == 2 and name.endswith(".weight") and _adaptable(name))
        source = "safetensors headers"
    else:
        q, kv = heads * head_dim, kv_heads * head_dim
        per_layer = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden),
                     "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, q),
                     "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                     "mlp.down_proj": (hidden, inter)}
        linears = tuple((f"model.layers.{i}.{name}", o, n) for i in range(layers) for name, (o, n) in per_layer.items())
        embed = vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
        n_params = embed + sum(o * n for _, o, n in linears) + layers * 2 * hidden + hidden
        source = "config.json"
    return ModelFacts(hidden_size=int(hidden), intermediate_size=int(inter), num_layers=int(layers),
                      num_heads=int(heads), num_kv_heads=int(kv_heads), head_dim=int(head_dim),
                      vocab_size=int(vocab), n_params=int(n_params), linear_shapes=linears, source=source,
                      model_type=str(cfg.get("model_type") or ""))


def _adaptable(tensor_name: str) -> bool:
    """Linear weights LoRA 'all-linear' adapts: not embeddings, not the output head, not norms."""
    lowered = tensor_name.lower()
    return not any(k in lowered for k in ("embed", "lm_head", "wte", "wpe", "norm", "output.weight"))


def safetensors_tensors(model_dir: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) from every safetensors header of the model; {} when there is none."""
    files = sorted(model_dir.glob("*.safetensors"))
    out: dict[str, tuple[list[int], str]] = {}
    for path in files:
        try:
            with path.open("rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                if size > 100 * MiB:
                    return {}
                header = json.loads(fh.read(size))
        except (OSError, struct.error, ValueError):
            return {}  # corrupt or partial file: fall back to the config.json formula
        for name, info in header.items():
            if name != "__metadata__" and isinstance(info, dict):
                out[name] = (list(info.get("shape", [])), str(info.get("dtype", "")))
    return out


def stored_dtype(model_dir: str | Path) -> str | None:
    """The most common tensor dtype in the checkpoint (e.g. 'BF16'), None without safetensors."""
    tensors = safetensors_tensors(Path(model_dir))
    if not tensors:
        return None
    counts: Counter[str] = Counter()
    for shape, dtype in tensors.values():
        counts[dtype] += math.prod(shape)
    return counts.most_common(1)[0][0]


# ---------------------------------------------------------------------------------------- the estimate
@dataclass
class MemoryEstimate:
    """Peak memory of one training process, with where it goes (all numbers in bytes)."""

    total: int
    breakdown: dict[str, int]
    device: str  # "cuda" | "cpu"
    precision: str  # resolved: bf16 | fp16 | fp32
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    params_total: int
    params_trainable: int
    processes_sharing_memory: int = 1  # CPU DDP: every process holds a replica in the same RAM
    notes: list[str] = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return self.total / GiB

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["total_gib"] = round(self.total_gib, 3)
        return out

    def describe(self) -> str:
        """A short table for the CLI and the UI."""
        lines = [f"estimated peak {fmt_bytes(self.total)} ({self.device}, {self.precision}, batch {self.batch_size} x "
                 f"{self.seq_len} tokens, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'})"]
        lines += [f"  {k:<18} {fmt_bytes(v)}" for k, v in self.breakdown.items()]
        if self.processes_sharing_memory > 1:
            lines.append(f"  x {self.processes_sharing_memory} processes sharing this machine's RAM")
        return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"


def _adapted(facts: ModelFacts, config: TrainConfig) -> tuple[tuple[str, int, int], ...]:
    """(name, out, in) of the linear layers ``config``'s LoRA targets adapt."""
    targets = config.lora_targets
    return _adapted_linears(facts, targets if isinstance(targets, str) else tuple(targets))


@functools.lru_cache(maxsize=32)
def _adapted_linears(facts: ModelFacts, targets: str | tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    """Cached: the recommender estimates dozens of settings of one model and target list."""
    return tuple((n, o, i) for n, o, i in facts.linear_shapes
                 if targets == "all-linear" or any(n == t or n.endswith("." + t) for t in targets))


@functools.lru_cache(maxsize=32)
def _roles_per_layer(adapted: tuple[tuple[str, int, int], ...], hidden: int, layers: int) -> dict[str, float]:
    """How many adapted linears of each ``_linear_role`` a layer has (on average)."""
    roles = Counter(_linear_role(name, in_features, hidden) for name, _, in_features in adapted)
    return {role: count / layers for role, count in roles.items()}


def _lora_params(facts: ModelFacts, config: TrainConfig) -> int:
    """Trainable (LoRA, and DoRA magnitude) parameters for config's targets."""
    adapted = _adapted(facts, config)
    trainable = sum(config.lora_rank * (o + i) for _, o, i in adapted)
    if config.use_dora:
        trainable += sum(o for _, o, _ in adapted)
    return trainable


_ATTENTION_OUTPUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo")
_MLP_PARTS = ("mlp", "feed_forward", "ffn")


def _linear_role(name: str, in_features: int, hidden: int) -> str:
    """What a decoder layer's linear reads: "attn_in" / "mlp_in" (a norm's output: q/k/v, gate/up),
    "attn_out" (attention's output: o_proj) or "mlp_out" (the MLP product: down_proj). Llama, Qwen,
    Mistral, Gemma, Phi and Falcon names land right; anything else in attention counts as "attn_in"."""
    parts = name.lower().split(".")
    if any(p in _MLP_PARTS for p in parts):
        return "mlp_in" if in_features == hidden else "mlp_out"
    return "attn_out" if parts[-1] in _ATTENTION_OUTPUT_NAMES else "attn_in"


def resolve_precision(config: TrainConfig, device: str, bf16_ok: bool) -> str:
    """The trainer's rule (sage_ft.training.engine): auto = bf16 if supported, else fp16 (GPU) / fp32 (CPU)."""
    if config.precision != "auto":
        return config.precision
    if device == "cuda":
        return "bf16" if bf16_ok else "fp16"
    return "bf16" if bf16_ok else "fp32"


def _facts_for(config: TrainConfig, model_dir: str | Path | ModelFacts | None) -> ModelFacts:
    if isinstance(model_dir, ModelFacts):
        return model_dir
    if model_dir is None:
        name = config.model_name_or_path
        if name == "demo":
            from sage_ft import paths

            built = paths.demo_model_dir()
            if (built / "config.json").exists():
                return model_facts(built)
            from sage_ft.models.demo import MODEL_SHAPE, SPECIAL_TOKENS, VOCAB_SIZE

            return facts_from_config({**MODEL_SHAPE, "vocab_size": VOCAB_SIZE + len(SPECIAL_TOKENS)})
        model_dir = name
    path = Path(model_dir).expanduser()
    if not (path / "config.json").exists():
        cached = _hf_cached_config(str(model_dir))
        if cached is None:
            raise EstimateError(f"{path}/config.json not found; the estimate needs the model on this machine "
                                "(a local directory, or a Hugging Face id already in the cache)")
        path = cached.parent
    return model_facts(path)


def _hf_cached_config(repo_id: str) -> Path | None:
    """config.json of a hub id in the local HF cache (never downloads)."""
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:
        return None
    return Path(found) if isinstance(found, str) else None


def activation_bytes_per_token_layer(facts: ModelFacts, config: TrainConfig, precision: str, device: str,
                                     seq: int) -> float:
    """Bytes autograd keeps per token and decoder layer until the backward pass (no checkpointing).

    Modelled on what a Llama-style layer with peft LoRA saves, counted tensor by tensor with
    ``torch.autograd.graph.saved_tensors_hooks`` (``bench/saved_activations.py``; on CPU the count
    agrees to the byte, ``tests/test_estimate.py``). Frozen linears save no input (only their
    weights, for the input gradient); a LoRA A saves its input, so a norm's output is kept only when
    an adapted linear reads it. ``seq`` is a row's length: packed rows and padded batches have a
    mask, and then attention keeps seq values a token in every layer.
    """
    half = precision in ("bf16", "fp16")
    ab = 2 if half else 4  # bytes of a matmul output (the compute dtype)
    cpu_autocast = half and device == "cpu"  # fp32 weights, bf16 autocast: each LoRA A casts its own copy
    H, L = facts.hidden_size, facts.num_layers
    per_layer = _roles_per_layer(_adapted(facts, config), H, L)
    adapted = sum(per_layer.values())

    norms = 2 * (4 * H + 4)  # two RMSNorms: fp32 input and 1/rms
    for readers in (per_layer.get("attn_in", 0), per_layer.get("mlp_in", 0)):
        norms += readers * H * 2 if cpu_autocast else min(1.0, readers) * H * ab  # the output LoRA A reads
    # With a mask transformers repeats k and v to every query head before SDPA (its GQA path needs
    # no mask), and every layer's SDPA saves the mask converted to the compute dtype.
    masked = config.packing or config.per_device_train_batch_size > 1
    kv_saved = facts.q_dim if masked else facts.kv_dim
    attention = (facts.q_dim + 2 * kv_saved) * ab  # q, k, v after RoPE
    attention += facts.q_dim * ab + 4 * facts.num_heads  # the output (o_proj's LoRA A reads it), logsumexp
    if masked:
        attention += seq * ab
    mlp = 3 * facts.intermediate_size * ab  # gate (SiLU's input), act(gate) and up (the product's inputs)
    mlp += min(1.0, per_layer.get("mlp_out", 0)) * facts.intermediate_size * ab  # act*up, read by down's LoRA A
    lora = adapted * config.lora_rank * ab  # LoRA A outputs, read by LoRA B
    return norms + attention + mlp + lora


def autocast_weight_copy_bytes(facts: ModelFacts, config: TrainConfig, precision: str,
                               device: str) -> tuple[int, int]:
    """(LoRA matrices', frozen linears') bytes of the half-precision weight copies autocast makes and
    autograd keeps for the backward.

    Counted like the activations (``bench/saved_activations.py``: what a layer saves regardless of
    the tokens). Every linear whose weight is not in the compute dtype is cast once per forward and
    the copy is kept for the input gradient: on CPU (fp32 weights) every decoder linear, adapted or
    frozen, and the LoRA matrices; on a GPU (half-precision weights) only the LoRA matrices, which
    peft keeps in fp32. Apart because they live differently under gradient checkpointing: autocast
    caches the LoRA matrices' casts for the whole forward, the frozen ones' only while their layer runs.
    """
    if precision not in ("bf16", "fp16"):
        return 0, 0
    quantized = bool(config.quantization_bits)  # dequantized per matmul, never kept for the backward
    frozen = sum(o * i for _, o, i in facts.linear_shapes) if device == "cpu" and not quantized else 0
    return _lora_params(facts, config) * 2, frozen * 2


def estimate_memory(config: TrainConfig, model_dir: str | Path | ModelFacts | None = None, *,
                    device: str | None = None, bf16_ok: bool | None = None,
                    seq_len: int | None = None) -> MemoryEstimate:
    """Peak memory of one training process for ``config`` on ``model_dir`` (None: the config's model).

    ``device`` is "cuda" or "cpu" (default: from ``sage_ft.gpu.device_info()`` and ``config.devices``).
    ``seq_len`` is the padded length of a batch row: cutoff_len when packing (rows are filled to it),
    else pass the dataset's p95 token length (capped at cutoff_len) for a tighter estimate.
    """
    facts = _facts_for(config, model_dir)
    if device is None or bf16_ok is None:
        info_device, info_bf16 = _device_kind(config)
        device = device or info_device
        bf16_ok = info_bf16 if bf16_ok is None else bf16_ok
    precision = resolve_precision(config, device, bool(bf16_ok))
    seq = config.cutoff_len if config.packing or not seq_len else min(seq_len, config.cutoff_len)
    batch = config.per_device_train_batch_size
    tokens = batch * seq
    half = precision in ("bf16", "fp16")
    autocast_fp32_weights = half and device == "cpu"  # the CPU trainer keeps fp32 weights + autocast
    ab = 2 if half else 4  # bytes of a matmul output
    resid = 4 if (autocast_fp32_weights or not half) else 2  # the residual stream (layer inputs, final norm)
    H, inter, L, V = facts.hidden_size, facts.intermediate_size, facts.num_layers, facts.vocab_size
    trainable = _lora_params(facts, config)

    weight_bytes = 2 if half and not autocast_fp32_weights else 4
    weights = facts.n_params * weight_bytes
    if config.quantization_bits:
        linear = sum(o * i for _, o, i in facts.linear_shapes)
        per_param = QUANTIZED_BYTES_PER_PARAM[(config.quantization_bits, config.double_quantization)]
        dequantized = max((o * i for _, o, i in facts.linear_shapes), default=0) * weight_bytes
        weights = (facts.n_params - linear) * weight_bytes + linear * per_param + dequantized
    lora_params = trainable * 4
    lora_grads = trainable * 4
    optimizer = trainable * _OPTIMIZER_STATE_BYTES.get(config.optim, 8)

    per_token_layer = activation_bytes_per_token_layer(facts, config, precision, device, seq)
    lora_copies, frozen_copies = autocast_weight_copy_bytes(facts, config, precision, device)
    final_norm = tokens * (4 * H + resid * H)
    gradients_in_flight = tokens * (inter + H) * ab  # one layer's backward: an MLP-wide gradient and the input's
    layers_holding_activations = 1 if config.gradient_checkpointing else L
    if config.gradient_checkpointing:
        # Only the layer inputs stay; a layer's activations and its frozen weights' copies exist while
        # the backward recomputes it, after the loss's buffers are gone.
        activations = tokens * L * resid * H + final_norm
        copies = lora_copies
        layer_backward = tokens * per_token_layer + frozen_copies / L + gradients_in_flight
    else:
        activations = tokens * L * per_token_layer + final_norm
        copies = lora_copies + frozen_copies
        layer_backward = gradients_in_flight
    if fused_cross_entropy_available(facts.model_type, device):
        logits = tokens * H * 12  # fp32 logit chunks (~tokens x hidden elements) + the input gradient
    else:  # logits, log-softmax output and their gradients in fp32, plus the half-precision logits
        logits = tokens * V * (12 + (ab if half else 0))
    # The loss's buffers are freed before the layers' backward starts: the peak is the larger phase.
    backward = max(0, layer_backward - logits)
    overhead = GPU_OVERHEAD if device == "cuda" else CPU_OVERHEAD
    breakdown = {"weights": weights, "lora_params": lora_params, "lora_grads": lora_grads,
                 "optimizer_states": optimizer, "activations": activations, "logits": logits, "overhead": overhead}
    if copies:
        breakdown["autocast_copies"] = copies
    if backward:
        breakdown["backward"] = backward
    if device == "cuda" and precision == "fp32":  # on the layers' activations, wherever they are held
        breakdown["fp32_gpu_margin"] = tokens * per_token_layer * layers_holding_activations * CUDA_FP32_ACTIVATION_MARGIN
    if config.num_processes > 1:
        breakdown["ddp_buckets"] = trainable * 4
    notes = []
    if facts.source == "config.json":
        notes.append("parameter count from config.json (no safetensors headers)")
    return MemoryEstimate(total=int(sum(breakdown.values())), breakdown={k: int(v) for k, v in breakdown.items()},
                          device=device, precision=precision, batch_size=batch, seq_len=seq,
                          gradient_checkpointing=config.gradient_checkpointing, params_total=facts.n_params,
                          params_trainable=trainable,
                          processes_sharing_memory=config.num_processes if device == "cpu" else 1, notes=notes)


def quantization_available() -> bool:
    """Whether bitsandbytes is installed (``quantization_bit`` needs it); looked up, not imported."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def quantization_problem(config: TrainConfig) -> str | None:
    """Why ``config``'s quantization cannot run here (None when it can): said when the task is queued."""
    if config.quantization_bits and not quantization_available():
        return (f"quantization_bit: {config.quantization_bit} needs bitsandbytes, which is not installed; install "
                "it (pip install 'bitsandbytes>=0.50', or scripts/install.sh) or set quantization_bit: none")
    return None


# ---------------------------------------------------------------------------------------- device budget
def _device_kind(config: TrainConfig, info: dict[str, Any] | None = None) -> tuple[str, bool]:
    from sage_ft.gpu import device_info, selected_gpus

    info = info if info is not None else device_info()
    gpus = selected_gpus(info, config.devices)
    if gpus:
        return "cuda", all(g.get("bf16") for g in gpus)
    return "cpu", bool(info["cpu"].get("bf16"))


def available_memory(config: TrainConfig, info: dict[str, Any]) -> tuple[int, str]:
    """(bytes one training process may use, what that is) on the device ``config`` selects."""
    from sage_ft.gpu import selected_gpus

    gpus = selected_gpus(info, config.devices)
    if gpus:
        free = min(g["memory_free"] or 0 for g in gpus)
        names = ", ".join(f"GPU {g['index']}" for g in gpus)
        return free, f"free memory of {names}"
    return int(info["cpu"]["ram_available"]), "available RAM"


@dataclass
class FitReport:
    """Whether ``config`` fits; ``warning`` and ``suggestion`` are what the UI's blocking dialog shows."""

    fits: bool
    estimate: MemoryEstimate
    available: int
    warning: str
    suggestion: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"fits": self.fits, "estimate": self.estimate.to_dict(), "available": self.available,
                "warning": self.warning, "suggestion": self.suggestion}


@dataclass
class Recommendation:
    """Settings that fit the device; ``changes`` holds only the keys that differ from the input config."""

    config: TrainConfig
    changes: dict[str, Any]
    estimate: MemoryEstimate
    available: int
    fits: bool
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"changes": self.changes, "estimate": self.estimate.to_dict(), "available": self.available,
                "fits": self.fits, "reasons": self.reasons}


def _needed(est: MemoryEstimate) -> int:
    return est.total * est.processes_sharing_memory


def _budget(available: int) -> int:
    return int(available * HEADROOM)


def recommend(config: TrainConfig, model_dir: str | Path | ModelFacts | None = None,
              device: dict[str, Any] | None = None, *, seq_len: int | None = None) -> Recommendation:
    """Batch size, grad accumulation, cutoff_len, precision, quantization and gradient checkpointing
    that fit.

    The effective batch (batch x accumulation) is kept. Among the settings that fit within
    ``HEADROOM`` of the free memory, the least intrusive wins: keep cutoff_len, then keep the
    chosen precision, then keep the base unquantized (4-bit QLoRA, where bitsandbytes is installed,
    rounds the frozen weights but truncates no sample), then no gradient checkpointing (it costs
    ~30% speed), then the largest batch. ``device`` is a ``device_info()`` dict (default: detected now).
    """
    from sage_ft.gpu import device_info

    info = device if device is not None else device_info()
    facts = _facts_for(config, model_dir)
    kind, bf16_ok = _device_kind(config, info)
    available, _ = available_memory(config, info)
    budget = _budget(available)
    base_precision = resolve_precision(config, kind, bf16_ok)
    precisions = [base_precision]
    if base_precision == "fp32" and (kind == "cuda" or bf16_ok):
        precisions.append("bf16" if bf16_ok else "fp16")
    quantizations = [config.quantization_bit]
    if config.quantization_bit != "4" and quantization_available():
        quantizations.append("4")
    effective = config.per_device_train_batch_size * config.gradient_accumulation_steps
    batches = sorted((b for b in range(1, effective + 1) if effective % b == 0), reverse=True)
    cutoffs = [config.cutoff_len]
    while cutoffs[-1] // 2 >= MIN_CUTOFF:
        cutoffs.append(cutoffs[-1] // 2)

    best: tuple[tuple, TrainConfig, MemoryEstimate] | None = None
    for ci, cutoff in enumerate(cutoffs):
        for pi, precision in enumerate(precisions):
            for qi, bits in enumerate(quantizations):
                for gc in (False, True):
                    for batch in batches:
                        trial = dataclasses.replace(config, per_device_train_batch_size=batch,
                                                    gradient_accumulation_steps=effective // batch,
                                                    cutoff_len=cutoff, gradient_checkpointing=gc,
                                                    precision=config.precision if pi == 0 else precision,
                                                    quantization_bit=bits)
                        est = estimate_memory(trial, facts, device=kind, bf16_ok=bf16_ok, seq_len=seq_len)
                        if _needed(est) <= budget:
                            cost = (ci, pi, qi, gc, -batch)
                            if best is None or cost < best[0]:
                                best = (cost, trial, est)
                            break  # larger batches were tried first; smaller ones only cost more
                if best is not None and best[0][:3] == (ci, pi, qi):
                    break
            if best is not None and best[0][:2] == (ci, pi):
                break
        if best is not None:
            break

    if best is None:  # nothing fits: report the smallest setting so the user sees how far off it is
        trial = dataclasses.replace(config, per_device_train_batch_size=1, gradient_accumulation_steps=effective,
                                    cutoff_len=cutoffs[-1], precision=precisions[-1], gradient_checkpointing=True,
                                    quantization_bit=quantizations[-1])
        est = estimate_memory(trial, facts, device=kind, bf16_ok=bf16_ok, seq_len=seq_len)
        quantized = f", a {trial.quantization_bit}-bit base" if trial.quantization_bits else ""
        return Recommendation(config=trial, changes=_diff(config, trial), estimate=est, available=available,
                              fits=False, reasons=[f"even batch 1, cutoff_len {cutoffs[-1]}, {precisions[-1]}{quantized} "
                                                   f"and gradient checkpointing need {fmt_bytes(_needed(est))}, more "
                                                   f"than {fmt_bytes(budget)} usable; use a smaller model or a bigger "
                                                   "device"])
    _, trial, est = best
    changes = _diff(config, trial)
    reasons = [_why(key, value, config) for key, value in changes.items()]
    return Recommendation(config=trial, changes=changes, estimate=est, available=available, fits=True,
                          reasons=reasons or ["the current settings fit"])


def _diff(old: TrainConfig, new: TrainConfig) -> dict[str, Any]:
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "cutoff_len", "precision",
            "quantization_bit", "gradient_checkpointing")
    return {k: getattr(new, k) for k in keys if getattr(new, k) != getattr(old, k)}


def _why(key: str, value: Any, old: TrainConfig) -> str:
    before = getattr(old, key)
    return {
        "per_device_train_batch_size": f"batch size {before} -> {value} (the effective batch is kept)",
        "gradient_accumulation_steps": f"gradient accumulation {before} -> {value}",
        "cutoff_len": f"cutoff_len {before} -> {value} (longer samples are truncated)",
        "precision": f"precision {before} -> {value} (halves weights and activations)",
        "quantization_bit": f"quantization_bit {before} -> {value} (QLoRA: the base's linear layers in {value} bits, "
                            "about a quarter of their memory; slightly less exact)",
        "gradient_checkpointing": "gradient checkpointing " + ("on (saves activations, ~30% slower)" if value
                                                              else "off (it fits without; faster)"),
    }[key]


def check_fit(config: TrainConfig, model_dir: str | Path | ModelFacts | None = None,
              device: dict[str, Any] | None = None, *, seq_len: int | None = None) -> FitReport:
    """Does ``config`` fit as it is? If not, ``warning`` says by how much and ``suggestion`` what to change."""
    from sage_ft.gpu import device_info

    info = device if device is not None else device_info()
    kind, bf16_ok = _device_kind(config, info)
    available, what = available_memory(config, info)
    est = estimate_memory(config, model_dir, device=kind, bf16_ok=bf16_ok, seq_len=seq_len)
    needed = _needed(est)
    if needed <= _budget(available):
        return FitReport(fits=True, estimate=est, available=available, warning="", suggestion={})
    rec = recommend(config, model_dir, info, seq_len=seq_len)
    where = "GPU memory" if kind == "cuda" else "RAM"
    warning = (f"{where} insufficient: this run needs about {fmt_bytes(needed)} but only {fmt_bytes(available)} "
               f"is free ({what}; {int(HEADROOM * 100)}% usable). ")
    if rec.fits:
        warning += "Suggested: " + "; ".join(rec.reasons) + f" -> about {fmt_bytes(_needed(rec.estimate))}."
    else:
        warning += rec.reasons[0] + "."
    return FitReport(fits=False, estimate=est, available=available, warning=warning,
                     suggestion=rec.changes if rec.fits else {})
