"""Built-in chat templates (Jinja, as used by transformers' ``apply_chat_template`` and by vLLM).

``template: auto`` uses the model's own template; these are for models that ship none, and the
ChatML one is the demo model's own template.
"""

from __future__ import annotations

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2/2.5 use ChatML with a default system prompt.
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}" + CHATML_TEMPLATE
)

BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "qwen": QWEN_TEMPLATE}


def chat_template_for(template: str, tokenizer) -> str:
    """The Jinja template to use for ``template`` ('auto' = the tokenizer's own).

    Raises ``ValueError`` with what to do when 'auto' is asked of a tokenizer without a template.
    """
    if template == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if own:
            return own
        raise ValueError(
            "the model's tokenizer has no chat template; set template to one of "
            + ", ".join(BUILTIN_TEMPLATES)
        )
    try:
        return BUILTIN_TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown template {template!r}; use auto or one of {', '.join(BUILTIN_TEMPLATES)}") from None
