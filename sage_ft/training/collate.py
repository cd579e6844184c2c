"""Batching for speed: length-grouped batches, then packing where it is cheaper than padding.

Why this is faster than a plain ``Trainer`` with its default collator (pad every batch to its
longest sample, random order): chat data has long-tailed (log-normal) lengths, so a random batch of 8
pads to its longest member and roughly half of the computed tokens are padding — pure waste, since
every padded position still goes through every matmul. Two fixes, combined:

1. ``LengthGroupedSampler`` sorts samples by length, cuts the sorted list into batches of similar
   lengths, and shuffles the *batches* (seeded, per epoch). Each batch then pads to nearly its own
   length; padding drops from ~50% to a few percent. Batches still contain the same number of
   samples, so the optimisation (samples per step, loss normalisation) is unchanged.
2. ``PackingCollator`` may lay a batch out as packed rows instead of a padded rectangle: several
   samples concatenated in one row, ``position_ids`` restarting at 0 for each sample. transformers
   builds a block-diagonal causal mask from those position_ids (the padding-free path), so no token
   attends across samples and the loss equals the unpacked loss. Packing removes the remaining
   padding, but with SDPA (CPU) attention is still computed over the whole packed row, so a row of
   four 256-token samples costs 4x the attention of four separate rows. The collator therefore uses a
   small cost model (linear work ~ tokens x 2·params-per-token, attention work ~ row_len² x 4·hidden
   per layer) and picks, per batch, the cheaper layout: padded when lengths are already equal,
   packed when a few long samples come with many short ones. On GPUs with FlashAttention varlen
   kernels attention is per sample, which the cost model reflects through ``attention_is_per_sample``.

3. With ``micro_batch_by_tokens`` (``token_budget`` > 0) the collator receives all samples of an
   optimizer step (batch x gradient accumulation) and splits them into the fewest micro-batches of
   at most ``token_budget`` computed tokens (batch x the longest sample: the most any sample-count
   micro-batch could already hold, so peak memory does not grow). Steps of short samples then take
   one forward/backward instead of ``gradient_accumulation_steps``; on GPUs, where a small model's
   micro-step is bound by the host launching kernels, the number of micro-steps is what the step
   time follows. Same samples per step and the same loss normalisation (summed over the step's
   label tokens), so the update is the same as with sample-count micro-batches of the same samples.

Useful (non-padding) tokens are what matters; ``padding_fraction`` is reported as a metric.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sage_ft.data.tokenize import IGNORE_INDEX

# Key of the batch's real-token count (an int the trainer pops before the forward pass; see
# ``engine.make_trainer``): counting from the device tensors would sync the GPU every micro-step.
REAL_TOKENS_KEY = "num_real_tokens"
# Key of an optimizer step's micro-batches when its samples do not fit one ``token_budget``; the
# trainer runs forward/backward over each (``engine.make_trainer``'s ``training_step``).
MICRO_BATCHES_KEY = "micro_batches"


class LengthGroupedSampler:
    """Indices in batches of similar length; the batch order is shuffled with ``seed`` + epoch.

    Deterministic for a given (seed, epoch), so resuming a run replays the same order and the
    Trainer's skip-ahead lands on the same batches. Sorting is global rather than within
    "megabatches": datasets for LoRA runs are small enough, and global sorting gives the least
    padding; randomness comes from shuffling whole batches and ties.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths = list(lengths)
        self.batch_size = max(1, batch_size)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)  # random tie-breaking among equal lengths
        order.sort(key=lambda i: self.lengths[i])
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass
class PackingCollator:
    """Collate a batch either padded (right) or packed into rows of at most ``max_row_len`` tokens.

    ``packing=False`` always pads. ``stats`` accumulates real and computed tokens so the run can
    report the padding fraction without extra passes.
    """

    pad_token_id: int
    max_row_len: int
    packing: bool = True
    linear_cost_per_token: float = 1.0  # ~ 2 x parameters touched per token (matmul FLOPs)
    attention_cost_per_pair: float = 0.0  # ~ 4 x hidden x layers (QK^T and AV FLOPs per token pair)
    attention_is_per_sample: bool = False  # FlashAttention varlen: packed rows cost sum(len²), not row²
    token_budget: int = 0  # > 0: split a batch into micro-batches of at most this many computed tokens
    stats: dict[str, int] = field(default_factory=lambda: {"real_tokens": 0, "padded_tokens": 0,
                                                           "packed_batches": 0, "padded_batches": 0})

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(f["input_ids"]) for f in features]
        groups = split_by_token_budget(lengths, self.token_budget) if self.token_budget else [range(len(features))]
        if len(groups) == 1:
            batch = self._layout(features)
        else:
            batch = {MICRO_BATCHES_KEY: [self._layout([features[i] for i in group]) for group in groups]}
        batch[REAL_TOKENS_KEY] = sum(lengths)  # a plain int: the trainer counts tokens without a device sync
        return batch

    def _layout(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """One micro-batch, padded or packed, whichever the cost model says is cheaper (and fits)."""
        lengths = [len(f["input_ids"]) for f in features]
        best = self.best_packing(lengths) if self.packing else None
        if (best is not None and self.packed_cost(lengths, best) < self.padded_cost(lengths)
                and (not self.token_budget or packed_size(lengths, best) <= self.token_budget)):
            self.stats["packed_batches"] += 1
            return self._packed(features, best)
        self.stats["padded_batches"] += 1
        return self._padded(features)

    def best_packing(self, lengths: list[int]) -> list[list[int]] | None:
        """The cheapest packed layout: rows as long as ``max_row_len``, or only as long as the batch's
        longest sample. The latter never costs more than padding (fewer rows, none longer than the
        padded width), so on CPU, where attention spans a whole row, it is usually the one that wins:
        the short samples of a batch fill the space that padding would have wasted."""
        layouts = [rows for cap in sorted({max(lengths), self.max_row_len})
                   if (rows := pack_rows(lengths, cap)) is not None]
        return min(layouts, key=lambda rows: self.packed_cost(lengths, rows), default=None)

    def padded_cost(self, lengths: list[int]) -> float:
        longest = max(lengths)
        return len(lengths) * (longest * self.linear_cost_per_token + longest ** 2 * self.attention_cost_per_pair)

    def packed_cost(self, lengths: list[int], rows: list[list[int]]) -> float:
        longest = packed_size(lengths, rows) // len(rows)
        if self.attention_is_per_sample:
            attention = sum(n ** 2 for n in lengths)
        else:  # every row is padded to the longest row and attends over its whole length
            attention = len(rows) * longest ** 2
        return len(rows) * longest * self.linear_cost_per_token + attention * self.attention_cost_per_pair

    def _padded(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"])
            labels[row, :n] = torch.as_tensor(f["labels"])
            mask[row, :n] = 1
        self._count(sum(len(f["input_ids"]) for f in features), ids.numel())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def _packed(self, features: list[dict[str, Any]], rows: list[list[int]]) -> dict[str, Any]:
        """Rows of concatenated samples; position_ids restart per sample (no cross-sample attention).

        The first label of every sample after the first in a row is set to -100: the model shifts
        labels by one, so that position would otherwise predict the next sample's first token from
        the previous sample's last token.
        """
        import torch

        row_lens = [sum(len(features[i]["input_ids"]) for i in row) for row in rows]
        longest = max(row_lens)
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, row in enumerate(rows):
            pos = 0
            for i in row:
                n = len(features[i]["input_ids"])
                ids[r, pos:pos + n] = torch.as_tensor(features[i]["input_ids"])
                labels[r, pos:pos + n] = torch.as_tensor(features[i]["labels"])
                labels[r, pos] = IGNORE_INDEX
                positions[r, pos:pos + n] = torch.arange(n)
                pos += n
            if pos < longest:  # trailing padding of a shorter row: its own "sample" of positions
                positions[r, pos:] = torch.arange(longest - pos)
        self._count(sum(row_lens), ids.numel())
        return {"input_ids": ids, "labels": labels, "position_ids": positions}

    def _count(self, real: int, computed: int) -> None:
        self.stats["real_tokens"] += real
        self.stats["padded_tokens"] += computed - real

    @property
    def padding_fraction(self) -> float:
        total = self.stats["real_tokens"] + self.stats["padded_tokens"]
        return self.stats["padded_tokens"] / total if total else 0.0


def packed_size(lengths: list[int], rows: list[list[int]]) -> int:
    """Computed tokens of a packed layout: every row is as long as the longest one."""
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)


def split_by_token_budget(lengths: list[int], budget: int) -> list[list[int]]:
    """Sample indices in the fewest groups whose padded size (count x longest) is at most ``budget``.

    Greedy over the lengths in ascending order: each group takes samples until one more would push
    count x longest over the budget. For this constraint (monotone in the longest member) the greedy
    cut of the sorted list is optimal. A sample longer than the budget gets a group of its own.
    """
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def pack_rows(lengths: list[int], max_row_len: int) -> list[list[int]] | None:
    """First-fit-decreasing bin packing of sample indices into rows of at most ``max_row_len``.

    None when packing would not put two samples in any row (nothing to gain).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_row_len - lengths[i])
    if len(rows) == len(lengths):
        return None
    return [sorted(row) for row in rows]


def cost_model(model_config: Any, trainable_fraction: float = 0.0) -> tuple[float, float]:
    """(linear cost per token, attention cost per token pair) from a model config, in FLOPs.

    Forward+backward of a dense layer is ~6 FLOPs per weight per token; attention scores and the
    weighted sum are ~4·hidden FLOPs per token pair per layer forward (x3 with backward). Only the
    ratio matters for choosing a layout.
    """
    hidden = getattr(model_config, "hidden_size", 512)
    layers = getattr(model_config, "num_hidden_layers", 1)
    inter = getattr(model_config, "intermediate_size", 4 * hidden)
    heads = getattr(model_config, "num_attention_heads", 1) or 1
    kv_heads = getattr(model_config, "num_key_value_heads", heads) or heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    attn_params = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp_params = 3 * hidden * inter
    linear = 6.0 * layers * (attn_params + mlp_params) + 6.0 * hidden * getattr(model_config, "vocab_size", 0)
    attention = 12.0 * layers * heads * head_dim
    return linear, attention


def useful_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens in a collated batch (for tokens/s)."""
    if REAL_TOKENS_KEY in batch:
        return int(batch[REAL_TOKENS_KEY])
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def steps_per_epoch(n_samples: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(math.ceil(n_samples / batch_size) / grad_accum))
