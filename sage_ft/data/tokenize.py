"""Chat conversations -> ``{"input_ids", "labels"}`` with loss on assistant tokens only.

Why prefixes: the assistant spans are found by rendering the chat template on growing prefixes of
the conversation (``messages[:i]`` with the generation prompt = where turn *i*'s content starts;
``messages[:i+1]`` = where it ends, end-of-turn token included). That works for any Jinja template
(ChatML, Llama 3, Qwen's default system prompt, ...) without ``{% generation %}`` markers, which
few models ship. The full conversation is then tokenised once and each token is labelled by its
character offset, so tokenisation is exactly what the model sees at inference time.
"""

from __future__ import annotations

import logging
from typing import Any

from sage_ft.data.templates import chat_template_for

IGNORE_INDEX = -100  # the label value transformers' loss ignores
log = logging.getLogger(__name__)


class TokenizedSamples(list):
    """A list of samples that also says how many conversations were dropped or truncated."""

    dropped: int = 0  # no trainable token left after truncation (or no assistant turn at all)
    truncated: int = 0  # longer than cutoff_len


def tokenize_conversations(conversations: list[list[dict[str, str]]], tokenizer: Any, cutoff_len: int,
                           template: str = "auto") -> TokenizedSamples:
    """Tokenise each conversation; labels are -100 except on assistant-turn tokens.

    Samples are truncated to ``cutoff_len`` tokens (the start is kept); samples left without a
    trainable token are dropped and counted in ``result.dropped``.
    """
    jinja = chat_template_for(template, tokenizer)
    out = TokenizedSamples()
    for messages in conversations:
        sample = tokenize_conversation(messages, tokenizer, jinja)
        if len(sample["input_ids"]) > cutoff_len:
            out.truncated += 1
            sample = {key: value[:cutoff_len] for key, value in sample.items()}
        if all(label == IGNORE_INDEX for label in sample["labels"]):
            out.dropped += 1
            continue
        out.append(sample)
    if out.dropped:
        log.info("%d of %d conversations dropped: no assistant token within cutoff_len %d",
                 out.dropped, len(conversations), cutoff_len)
    return out


def tokenize_conversation(messages: list[dict[str, str]], tokenizer: Any, jinja: str) -> dict[str, list[int]]:
    """One conversation, untruncated (see the module docstring for how spans are found)."""
    text = _render(tokenizer, jinja, messages, add_generation_prompt=False)
    spans = assistant_spans(messages, tokenizer, jinja, text)
    # verbose=False: the whole conversation is tokenised, then cut at cutoff_len (and counted as
    # truncated); transformers' "longer than the maximum sequence length ... will result in indexing
    # errors" would warn of a length the model never sees (preflight holds cutoff_len to its context).
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = list(enc["input_ids"])
        labels = [tok if _in_spans(start, end, spans) else IGNORE_INDEX
                  for tok, (start, end) in zip(ids, enc["offset_mapping"], strict=True)]
        return {"input_ids": ids, "labels": labels}
    # Slow tokenizers have no offsets: tokenise the text piece by piece at the span boundaries.
    ids, labels, pos = [], [], 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, trainable in ((text[pos:start], False), (text[start:end], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
                ids += piece_ids
                labels += piece_ids if trainable else [IGNORE_INDEX] * len(piece_ids)
        pos = end
    return {"input_ids": ids, "labels": labels}


def assistant_spans(messages: list[dict[str, str]], tokenizer: Any, jinja: str, text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` produced by assistant turns (content + end-of-turn marker)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, jinja, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, jinja, messages[: i + 1], add_generation_prompt=False)
        if text.startswith(through) and through.startswith(before):
            spans.append((len(before), len(through)))
            continue
        # A template that renders prefixes differently (e.g. a moving date line): fall back to the
        # content itself, searched after the previous span.
        start = text.find(message["content"], spans[-1][1] if spans else 0)
        if start < 0:
            raise ValueError("the chat template does not reproduce assistant messages verbatim; "
                             "choose a built-in template (chatml, llama3, qwen)")
        spans.append((start, start + len(message["content"])))
    return spans


def _render(tokenizer: Any, jinja: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _in_spans(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """A token is trainable when it starts inside an assistant span (zero-width tokens never)."""
    return end > start and any(s <= start < e for s, e in spans)


def token_length_stats(samples: list[dict[str, list[int]]], cutoff_len: int) -> dict[str, float]:
    """Length statistics of tokenised samples (for ``check-data --model`` and the run's meta)."""
    lengths = sorted(len(s["input_ids"]) for s in samples)
    if not lengths:
        return {"count": 0, "min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0, "total_tokens": 0,
                "trainable_tokens": 0, "at_cutoff": 0, "cutoff_len": cutoff_len}
    pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
    return {
        "count": len(lengths), "min": lengths[0], "mean": sum(lengths) / len(lengths), "p50": pick(0.5),
        "p95": pick(0.95), "max": lengths[-1], "total_tokens": sum(lengths),
        "trainable_tokens": sum(sum(1 for x in s["labels"] if x != IGNORE_INDEX) for s in samples),
        "at_cutoff": sum(1 for n in lengths if n >= cutoff_len), "cutoff_len": cutoff_len,
    }
