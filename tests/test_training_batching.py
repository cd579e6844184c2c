"""Length-grouped sampling and packing: same loss as padding, less padding, deterministic order."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sage_ft.data.tokenize import tokenize_conversations
from sage_ft.training.collate import (
    MICRO_BATCHES_KEY,
    REAL_TOKENS_KEY,
    LengthGroupedSampler,
    PackingCollator,
    cost_model,
    pack_rows,
    split_by_token_budget,
)


def _conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    words = "the model learns from short and long answers about many different topics today".split()
    out = []
    for i in range(n):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))
        out.append([{"role": "user", "content": f"{i}: {question}"}, {"role": "assistant", "content": answer}])
    return out


@pytest.fixture(scope="module")
def model_and_samples(demo_model: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    model.config.use_cache = False
    model.eval()
    samples = tokenize_conversations(_conversations(8), tokenizer, cutoff_len=512)
    return model, tokenizer, list(samples)


def _loss(model, batch) -> float:
    import torch

    with torch.no_grad():
        return model(**batch).loss.item()


def test_packed_rows_give_the_same_loss_as_padded_batches(model_and_samples) -> None:
    model, tokenizer, samples = model_and_samples
    collator = PackingCollator(pad_token_id=tokenizer.pad_token_id, max_row_len=512)
    padded = collator._padded(samples)
    rows = pack_rows([len(s["input_ids"]) for s in samples], 512)
    assert rows is not None and len(rows) < len(samples)  # several samples share a row
    packed = collator._packed(samples, rows)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == len(rows)
    # Same number of trained tokens in both layouts (only the never-used first labels differ).
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"][:, 1:] != -100).sum())
    reference = _loss(model, padded)
    packed_error = abs(_loss(model, packed) - reference)
    assert packed_error <= 1e-4 * max(1.0, reference)
    # Control: the same packed rows WITHOUT restarting position ids attend across samples. Even a
    # random-init model (which barely uses context) then differs far beyond float noise.
    leaky = dict(packed)
    leaky.pop("position_ids")
    assert abs(_loss(model, leaky) - reference) > 20 * max(packed_error, 1e-6)


def test_collator_picks_the_cheaper_layout_and_reports_padding(model_and_samples) -> None:
    model, tokenizer, _ = model_and_samples
    linear, attention = cost_model(model.config)
    collator = PackingCollator(pad_token_id=0, max_row_len=1024, linear_cost_per_token=linear,
                               attention_cost_per_pair=attention)
    equal = [{"input_ids": [1] * 100, "labels": [1] * 100} for _ in range(4)]
    batch = collator(equal)
    assert "attention_mask" in batch and collator.stats["padded_batches"] == 1  # nothing to gain by packing
    assert batch[REAL_TOKENS_KEY] == 400  # counted on the host: the trainer reads no device tensor back
    assert collator.padding_fraction == 0.0
    skewed = [{"input_ids": [1] * n, "labels": [1] * n} for n in (400, 20, 20, 20, 20, 20, 20, 20)]
    batch = collator(skewed)
    assert "position_ids" in batch and collator.stats["packed_batches"] == 1
    assert batch[REAL_TOKENS_KEY] == 540
    assert batch["input_ids"].shape[0] < len(skewed)
    unpacked = PackingCollator(pad_token_id=0, max_row_len=1024, packing=False)
    unpacked(skewed)
    assert unpacked.padding_fraction > 0.5 > collator.padding_fraction


def test_token_budget_splits_a_step_into_the_fewest_micro_batches_that_fit() -> None:
    rng = random.Random(3)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(max(lengths), 4000)
        groups = split_by_token_budget(lengths, budget)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(len(g) * max(lengths[i] for i in g) <= budget for g in groups)
        # No split into fewer groups exists: even the shortest samples, taken greedily, need this many
        # (a lower bound from sorted order: group k can hold at most budget // its longest member).
        ordered, needed, start = sorted(lengths), 0, 0
        while start < len(ordered):
            end = start + 1
            while end < len(ordered) and (end - start + 1) * ordered[end] <= budget:
                end += 1
            needed, start = needed + 1, end
        assert len(groups) == needed
    assert split_by_token_budget([50, 10, 10], 40) == [[1, 2], [0]]  # longer than the budget: a group of its own


def test_collator_with_a_token_budget_returns_micro_batches_within_it() -> None:
    collator = PackingCollator(pad_token_id=0, max_row_len=1024, linear_cost_per_token=1.0,
                               attention_cost_per_pair=0.01, token_budget=2 * 300)
    short = [{"input_ids": [1] * n, "labels": [1] * n} for n in (40, 50, 60, 70, 70, 60, 50, 40)]
    batch = collator(short)  # 8 x 70 = 560 <= 600: one micro-batch, the plain layout
    assert MICRO_BATCHES_KEY not in batch and batch[REAL_TOKENS_KEY] == 440
    long = [{"input_ids": [1] * n, "labels": [1] * n} for n in (300, 290, 280, 270, 20, 20, 20, 20)]
    batch = collator(long)
    chunks = batch[MICRO_BATCHES_KEY]
    assert batch[REAL_TOKENS_KEY] == 1220 and len(chunks) == 3  # [20 x 4], [270, 280], [290, 300]
    assert all(c["input_ids"].numel() <= 600 for c in chunks)
    assert sum(int((c["labels"] != -100).sum()) for c in chunks) > 0
    assert not any(MICRO_BATCHES_KEY in c or REAL_TOKENS_KEY in c for c in chunks)


def test_length_grouped_sampler_is_deterministic_complete_and_groups_lengths() -> None:
    rng = random.Random(1)
    lengths = [int(rng.lognormvariate(5, 0.8)) + 1 for _ in range(200)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=42)
    order = list(sampler)
    assert sorted(order) == list(range(200))
    assert order == list(LengthGroupedSampler(lengths, batch_size=8, seed=42))  # resume replays the same order
    sampler.set_epoch(1)
    assert list(sampler) != order  # a new epoch reshuffles

    def padding(indices: list[int]) -> float:
        batches = [indices[i:i + 8] for i in range(0, len(indices), 8)]
        computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths) / computed

    random_order = list(range(200))
    rng.shuffle(random_order)
    assert padding(order) < 0.1 < padding(random_order)


def test_lora_without_input_casts_gives_the_same_loss_and_gradients_under_autocast(demo_model: Path) -> None:
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    from sage_ft.config import TrainConfig
    from sage_ft.training.engine import apply_lora, skip_redundant_input_casts

    config, _ = TrainConfig.from_dict({"model_name_or_path": str(demo_model), "dataset": "x.jsonl", "lora_rank": 8})
    model = apply_lora(AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32), config)
    with torch.no_grad():  # non-zero B, so the LoRA path contributes to the loss
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    ids = torch.randint(0, len(model.get_input_embeddings().weight), (2, 24), generator=torch.Generator().manual_seed(0))

    def loss_and_grads() -> tuple[float, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    loss, grads = loss_and_grads()
    skip_redundant_input_casts(model)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    loss2, grads2 = loss_and_grads()
    assert loss2 == loss and torch.equal(grads2, grads)
