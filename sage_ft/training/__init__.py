"""In-process LoRA fine-tuning: ``FineTuneRun(config, emitter=None).run() -> RunResult``.

Light to import: torch/transformers/peft are loaded when a run starts (see ``engine``).
"""

from sage_ft.training.meta import read_meta
from sage_ft.training.run import FineTuneRun, RunFailure, RunResult

__all__ = ["FineTuneRun", "RunResult", "RunFailure", "read_meta"]
