"""In-process transformers chat backend: used when vLLM is not installed (or is disabled).

Same chat API as the vLLM path (streamed text chunks, adapters selected by name, cancellation), so
the app keeps working on a machine without vLLM — slower, one generation at a time. Adapters are
loaded with peft into one ``PeftModel``; the base model is served with the adapters disabled.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class LocalBackend:
    def __init__(self, model_path: str | Path, served_name: str):
        self.model_path = Path(model_path)
        self.served_name = served_name
        self.adapters: dict[str, str] = {}  # name -> adapter dir
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()  # one generation (and one adapter change) at a time

    def load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype="auto")
        self._model.eval()

    def add_adapter(self, name: str, path: str | Path) -> None:
        from peft import PeftModel

        with self._lock:
            if name in self.adapters:
                return
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(str(path), adapter_name=name)
            else:
                self._model = PeftModel.from_pretrained(self._model, str(path), adapter_name=name)
            self._model.eval()
            self.adapters[name] = str(path)

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            if name in self.adapters and len(self.adapters) > 1:
                self._model.delete_adapter(name)
                self.adapters.pop(name)

    def count_chat_tokens(self, model: str, messages: list[dict[str, str]]) -> tuple[int, int]:
        """(prompt tokens, context length): the model's positions, else the tokenizer's limit."""
        ids = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]
        return len(ids), self.context_len or 0

    @property
    def context_len(self) -> int | None:
        """The tokens the model reads: its positions, else the tokenizer's limit (None before ``load``)."""
        if self._model is None:
            return None
        return int(getattr(self._model.config, "max_position_embeddings", None) or self._tokenizer.model_max_length)

    def stream(self, messages: list[dict[str, str]], model: str, temperature: float = 0.7, top_p: float = 1.0,
               max_tokens: int = 256, stop: list[str] | str | None = None,
               cancel_event: threading.Event | None = None) -> Iterator[str]:
        """Generate in a thread, yield decoded text as it comes; ``stop`` strings end the reply."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        from sage_ft.serving.chat import ChatError

        if model != self.served_name and model not in self.adapters:
            raise ChatError(f"model {model!r} is not loaded; loaded: {', '.join([self.served_name, *self.adapters])}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        cancel = threading.Event()

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return cancel.is_set() or bool(cancel_event and cancel_event.is_set())

        inputs = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True, return_tensors="pt")
        streamer = TextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120)
        gen_kwargs = dict(**inputs, streamer=streamer, max_new_tokens=max_tokens,
                          stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                          pad_token_id=self._tokenizer.pad_token_id or self._tokenizer.eos_token_id)
        if temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            gen_kwargs.update(do_sample=False)
        errors: list[BaseException] = []

        def _generate() -> None:
            from peft import PeftModel

            try:
                with self._lock, torch.inference_mode():
                    if isinstance(self._model, PeftModel):
                        if model in self.adapters:
                            self._model.set_adapter(model)
                            self._model.generate(**gen_kwargs)
                        else:
                            with self._model.disable_adapter():
                                self._model.generate(**gen_kwargs)
                    else:
                        self._model.generate(**gen_kwargs)
            except BaseException as exc:  # reported to the consumer below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=_generate, name="sage-ft-local-generate", daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                if cancel_event is not None and cancel_event.is_set():
                    break
                text += piece
                cut = min((text.find(s) for s in stops if s in text), default=-1)
                if cut >= 0:
                    emitted = len(text) - len(piece)
                    if cut > emitted:
                        yield text[emitted:cut]
                    break
                if piece:
                    yield piece
        finally:
            cancel.set()
            thread.join(timeout=30)
        if errors:
            raise ChatError(f"local generation failed: {type(errors[0]).__name__}: {errors[0]}")
