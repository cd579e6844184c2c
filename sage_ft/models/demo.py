"""The built-in demo model: a tiny Llama-architecture causal LM built offline in seconds.

Random weights with a fixed seed, a byte-level BPE tokenizer trained with ``tokenizers`` on a fixed
text (``demo_tokenizer_corpus.txt``: the project's docs and UI strings as they were when it was
frozen), a ChatML chat template and head_dim 64 (vLLM's CPU attention needs >= 64). It is
saved as a normal Hugging Face directory, so every code path (training, vLLM serving, export) treats
it exactly like a downloaded model. The same builder is the test fixture.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path

from sage_ft import paths
from sage_ft.data.templates import CHATML_TEMPLATE

DEMO_NAME = "demo"
SEED = 1234
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MODEL_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # head_dim = 256 / 4 = 64
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
_MARKER = "sage_ft_demo.json"
# The output rows of the end-of-turn token and of the tokens that show nothing alone (white space, a
# piece of a multi-byte character), scaled down. With every weight random, a greedy reply ends, or
# shows only line breaks, spaces and U+FFFD, wherever those tokens' logits happen to come out on top:
# one build ended a reply after one token, another answered "Hello" with eight blank lines (builds
# differed when the tokenizer was trained on the live docs). Scaled, they are never
# the largest of 2,048 random logits, so an untrained greedy reply is visible text that runs to
# max_tokens (what the demo and the streaming tests need); fine-tuning still teaches them.
QUIET_ROW_SCALE = 0.5
CORPUS_FILE = Path(__file__).with_name("demo_tokenizer_corpus.txt")


def _training_corpus() -> list[str]:
    """Text to train the tokenizer on: a fixed file, so the demo model is the same in every checkout
    and after every edit (a tokenizer trained on the live docs changed the model with each change)."""
    return [CORPUS_FILE.read_text(encoding="utf-8")]


def quiet_token_ids(tokenizer) -> list[int]:
    """The end-of-turn token, then every token that shows nothing alone: white space only, or a piece
    of a multi-byte character (it decodes to U+FFFD)."""
    special = set(tokenizer.all_special_ids)
    texts = {i: tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in special}
    return [tokenizer.eos_token_id, *(i for i, text in texts.items() if not text.strip() or "\ufffd" in text)]


def _build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = MODEL_SHAPE["max_position_embeddings"]
    fast.save_pretrained(directory)
    return fast


def build_demo_model(path: str | Path | None = None, force: bool = False) -> Path:
    """Build the demo model into ``path`` (default: the data home's models/) and return the path.

    Written to a temporary sibling and renamed, so a half-built model is never left behind. torch and
    transformers are imported only when it has to be built: the app calls this on every start.
    """
    target = Path(path) if path else paths.demo_model_dir()
    if target.exists() and not force and (target / _MARKER).exists():
        return target
    # The app's start-up check and the chat server's first start ask for it at the same moment on a
    # fresh data home: one builds, the other waits and then finds it built (two threads importing
    # transformers at once also fails inside its lazy module loader).
    with _BUILD_LOCK:
        if target.exists() and not force and (target / _MARKER).exists():
            return target
        return _build(target)


_BUILD_LOCK = threading.Lock()


def _build(target: Path) -> Path:
    """Build into a temporary sibling of ``target``, then rename it into place."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=target.parent))
    try:
        tokenizer = _build_tokenizer(staging)
        config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False,
                             bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5, **MODEL_SHAPE)
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # see QUIET_ROW_SCALE
            model.lm_head.weight[quiet_token_ids(tokenizer)] *= QUIET_ROW_SCALE
        model.save_pretrained(staging, safe_serialization=True)
        GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         do_sample=False).save_pretrained(staging)
        (staging / _MARKER).write_text(json.dumps({"name": DEMO_NAME, "seed": SEED, "quiet_row_scale": QUIET_ROW_SCALE,
                                                     **MODEL_SHAPE}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.chmod(0o755)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_demo_model() -> Path:
    """The demo model's directory, built on first use."""
    return build_demo_model()


def is_demo_model(path: str | Path) -> bool:
    return (Path(path) / _MARKER).exists()
