"""SAGE Fine-Tune Studio: LoRA fine-tuning with a live web UI and a hot-swapping vLLM chat server.

The core (config, data, training, events, tasks, models, serving, export, gpu) never imports
Gradio; ``sage_ft.webui`` only renders and calls the core. Heavy libraries (torch, transformers,
vLLM) are imported inside the functions that need them so that ``import sage_ft`` stays fast.
"""

__version__ = "0.1.0"

import logging as _logging

# peft imports bitsandbytes whenever it is installed (it is, for quantization_bit), and on CPU that logs
# "Failed to load CPU gemm_4bit_forward ... pip install kernels" on every export, chat and run, QLoRA or
# not. The optional kernels only speed up CPU 4-bit matmuls; the fallback is correct.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
