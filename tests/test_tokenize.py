"""Assistant-only labels, truncation and length stats on the demo model's real tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sage_ft.data.tokenize import CHUNK, IGNORE_INDEX, token_length_stats, tokenize_conversations

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there!"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


def trainable_text(tokenizer, sample) -> str:
    return tokenizer.decode([t for t, lab in zip(sample["input_ids"], sample["labels"], strict=True) if lab != IGNORE_INDEX])


def test_only_assistant_turns_are_trained_multi_turn_with_system(tokenizer) -> None:
    [sample] = tokenize_conversations([CHAT], tokenizer, cutoff_len=1024)
    assert len(sample["input_ids"]) == len(sample["labels"])
    full = tokenizer.decode(sample["input_ids"])
    assert full == tokenizer.apply_chat_template(CHAT, tokenize=False)
    # Both assistant turns with their end-of-turn token; nothing of system or user.
    assert trainable_text(tokenizer, sample) == "Hello there!<|im_end|>\nParis.<|im_end|>\n"
    trained_ids = [lab for lab in sample["labels"] if lab != IGNORE_INDEX]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in trained_ids
    # Labels equal the input ids where they are trained (the model shifts them itself).
    assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(sample["input_ids"], sample["labels"], strict=True))


def test_template_with_injected_system_prompt(tokenizer) -> None:
    """The qwen template adds a default system prompt: spans must still land on the answers only."""
    [sample] = tokenize_conversations([CHAT[1:3]], tokenizer, cutoff_len=1024, template="qwen")
    assert "You are a helpful assistant." in tokenizer.decode(sample["input_ids"])
    assert trainable_text(tokenizer, sample) == "Hello there!<|im_end|>\n"


def test_llama3_style_template(tokenizer) -> None:
    [sample] = tokenize_conversations([CHAT], tokenizer, cutoff_len=1024, template="llama3")
    assert "Hello there!" in trainable_text(tokenizer, sample)
    assert "Capital" not in trainable_text(tokenizer, sample)
    assert "Be brief" not in trainable_text(tokenizer, sample)


def test_truncation_keeps_the_start_and_drops_samples_without_trainable_tokens(tokenizer) -> None:
    [full] = tokenize_conversations([CHAT], tokenizer, cutoff_len=1024)
    first_answer_end = max(i for i, lab in enumerate(full["labels"][:30]) if lab != IGNORE_INDEX) + 1
    cut = tokenize_conversations([CHAT], tokenizer, cutoff_len=first_answer_end + 3)
    assert cut.truncated == 1 and cut.dropped == 0
    assert cut[0]["input_ids"].tolist() == full["input_ids"][: first_answer_end + 3].tolist()
    assert "Paris" not in trainable_text(tokenizer, cut[0])
    # A cutoff inside the prompt leaves nothing to learn: the sample is dropped and counted.
    dropped = tokenize_conversations([CHAT, CHAT[1:3]], tokenizer, cutoff_len=8)
    assert len(dropped) == 0 and dropped.dropped == 2


def test_token_length_stats(tokenizer) -> None:
    samples = tokenize_conversations([CHAT, CHAT[1:3]], tokenizer, cutoff_len=1024)
    stats = token_length_stats(samples, cutoff_len=1024)
    lengths = sorted(len(s["input_ids"]) for s in samples)
    assert stats["count"] == 2 and stats["min"] == lengths[0] and stats["max"] == lengths[1]
    assert stats["total_tokens"] == sum(lengths)
    assert 0 < stats["trainable_tokens"] < stats["total_tokens"]
    assert token_length_stats([], 16)["count"] == 0


def test_conversation_longer_than_the_tokenizer_limit_is_cut_without_a_false_alarm(demo_model: Path) -> None:
    """The whole conversation is tokenised before it is cut at cutoff_len: transformers' warning that
    the sequence "will result in indexing errors" (it landed in every run log) must not appear."""
    import logging

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)  # fresh: transformers warns once per tokenizer
    long_chat = [{"role": "user", "content": "Tell me everything."},
                 {"role": "assistant", "content": " ".join(f"fact {i}." for i in range(tokenizer.model_max_length))}]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        [sample] = tokenize_conversations([long_chat], tokenizer, cutoff_len=64)
    finally:
        transformers_logger.removeHandler(handler)
    assert len(sample["input_ids"]) == 64
    assert not [r for r in records if "sequence length" in r.getMessage()], [r.getMessage() for r in records]


def test_a_large_set_is_tokenized_in_batches_with_progress_and_exactly_as_one_by_one(tokenizer) -> None:
    """Whole chunks go through the tokenizer at once (fast), reporting after each; batching must not
    pad, shift a label or mix conversations up: each sample equals the conversation tokenized alone."""
    conversations = [[{"role": "user", "content": f"Question {i}" + " and more" * (i % 7)},
                      {"role": "assistant", "content": f"Answer {i}" + " indeed" * (i % 11)}]
                     for i in range(2 * CHUNK + 7)]
    reports: list[tuple[int, int]] = []
    batched = tokenize_conversations(conversations, tokenizer, cutoff_len=1024,
                                     progress=lambda done, total: reports.append((done, total)))
    total = len(conversations)
    assert reports == [(CHUNK, total), (2 * CHUNK, total), (total, total)]
    assert len({len(s["input_ids"]) for s in batched}) > 5  # lengths differ: nothing was padded
    for i in (0, 1, CHUNK - 1, CHUNK, total - 1):
        alone = tokenize_conversations([conversations[i]], tokenizer, cutoff_len=1024)[0]
        assert {k: v.tolist() for k, v in batched[i].items()} == {k: v.tolist() for k, v in alone.items()}
        assert trainable_text(tokenizer, batched[i]) == conversations[i][1]["content"] + "<|im_end|>\n"


def test_samples_are_compact_int32_arrays(tokenizer) -> None:
    """8 bytes a token instead of ~47 as Python lists: a large dataset fits in memory."""
    [sample] = tokenize_conversations([CHAT], tokenizer, cutoff_len=1024)
    for key in ("input_ids", "labels"):
        assert sample[key].dtype == np.int32 and sample[key].nbytes == 4 * len(sample[key])
    assert tokenizer.decode(sample["input_ids"].tolist()) == tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_a_progress_callback_that_raises_stops_tokenizing(tokenizer) -> None:
    """How a run's cancel stops a long tokenization between chunks."""
    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        raise Stop(done)

    with pytest.raises(Stop) as raised:
        tokenize_conversations([CHAT] * (CHUNK + 1), tokenizer, cutoff_len=1024, progress=stop)
    assert raised.value.args == (CHUNK,)
