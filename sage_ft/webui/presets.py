"""Starting points for common kinds of fine-tune; each is a partial TrainConfig (plain values).

Only values that differ by use are set; everything else keeps the form's current value. The same
keys as the YAML file, so a preset is just a small config overlay, validated like any other.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, object]] = {
    # Multi-turn assistant chat: moderate context, a few epochs, light dropout.
    "chat": {"cutoff_len": 1024, "learning_rate": 2e-4, "num_train_epochs": 3.0, "lora_rank": 8,
             "lora_dropout": 0.05, "packing": True, "lr_scheduler_type": "cosine", "warmup_ratio": 0.03},
    # Code: long samples, a higher rank for more capacity, a lower learning rate.
    "code": {"cutoff_len": 2048, "learning_rate": 1e-4, "num_train_epochs": 2.0, "lora_rank": 16,
             "lora_dropout": 0.05, "packing": True, "lr_scheduler_type": "cosine", "warmup_ratio": 0.03},
    # Short question/answer pairs: short context, more epochs, packing to fill rows.
    "qa": {"cutoff_len": 512, "learning_rate": 2e-4, "num_train_epochs": 4.0, "lora_rank": 8,
           "lora_dropout": 0.0, "packing": True, "lr_scheduler_type": "cosine", "warmup_ratio": 0.0},
}
