"""SAGE Fine-Tune Studio: LoRA fine-tuning with a live web UI and a hot-swapping vLLM chat server.

The core (config, data, training, events, tasks, models, serving, export, gpu) never imports
Gradio; ``sage_ft.webui`` only renders and calls the core. Heavy libraries (torch, transformers,
vLLM) are imported inside the functions that need them so that ``import sage_ft`` stays fast.
"""

__version__ = "0.1.0"
