"""Dataset row formats: turn one alpaca / sharegpt / OpenAI-messages row into a conversation.

A conversation is ``list[{"role": "system"|"user"|"assistant", "content": str}]``: an optional
system message first, then user/assistant turns alternating, starting with user and ending with
assistant. Every converter either returns such a list or raises ``RowError`` with a short reason
category (used to group dropped rows in the report) and a detail naming the field or message.

Column mapping (``"canonical=file_key,..."``, e.g. ``"instruction=prompt,output=answer"``) says
which keys of *your* rows hold each canonical field:

- alpaca: ``instruction``, ``input``, ``output``, ``system``, ``history`` (a list of
  ``[user, assistant]`` pairs that come before the instruction).
- sharegpt / openai: ``messages`` (the list of turns; also spelled ``conversations``), ``role``
  (also ``from``), ``content`` (also ``value``), ``system`` (a top-level system prompt), and the
  role names used inside the turns: ``user_tag``, ``assistant_tag``, ``system_tag``
  (e.g. ``"user_tag=Q,assistant_tag=A"``).

Without a mapping, sharegpt reads ``conversations`` / ``from`` / ``value`` and openai reads
``messages`` / ``role`` / ``content``; both also accept the other spelling of each key and the roles
``human``/``user``, ``gpt``/``assistant``/``model``/``bot``, ``system``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

FORMATS = ("alpaca", "sharegpt", "openai")

ALPACA_KEYS = ("instruction", "input", "output", "system", "history")
CHAT_KEYS = ("messages", "role", "content", "system", "user_tag", "assistant_tag", "system_tag")
# Alternative canonical names a user may write on the left of '=' (LLaMA-Factory spells them so).
_KEY_ALIASES = {"conversations": "messages", "from": "role", "value": "content", "prompt": "instruction",
                "query": "input", "response": "output"}

# OpenAI tool calling: an assistant message with ``tool_calls`` (often with empty content), then a
# ``role: tool`` message with the result. Not trained on: the chat templates and the assistant-only
# labels here render and learn text turns; a call rendered as text would teach a format vLLM's tool
# parser does not read back. Such rows are dropped under this reason, which says so plainly.
TOOL_ROLES = ("tool", "function", "ipython")
TOOL_CALLS_REASON = "tool calls are not supported"
TOOL_CALLS_HELP = ("tool calling (assistant 'tool_calls' and 'tool' role messages) is not supported for training: "
                   "sage-ft trains on text replies only; remove these rows, or write the calls and results out as "
                   "plain user/assistant text")

_DEFAULT_ROLE_NAMES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
    "system": "system",
}


class RowError(Exception):
    """One row cannot be used. ``reason`` groups rows in the summary; ``detail`` pinpoints it."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class MappingError(ValueError):
    """A ``column_mapping`` string that cannot be parsed or names an unknown field."""


def parse_column_mapping(text: str | dict[str, str] | None) -> dict[str, str]:
    """``"instruction=prompt, output=answer"`` -> ``{"instruction": "prompt", "output": "answer"}``."""
    if not text:
        return {}
    items = text.items() if isinstance(text, dict) else _split_pairs(text)
    known = set(ALPACA_KEYS) | set(CHAT_KEYS)
    mapping: dict[str, str] = {}
    for key, value in items:
        key = _KEY_ALIASES.get(key.strip(), key.strip())
        value = str(value).strip()
        if key not in known:
            raise MappingError(
                f"column_mapping: unknown field {key!r}; alpaca fields: {', '.join(ALPACA_KEYS)}; "
                f"sharegpt/openai fields: {', '.join(CHAT_KEYS)} (e.g. 'instruction=prompt,output=answer')")
        if not value:
            raise MappingError(f"column_mapping: {key!r} maps to an empty key name; write {key}=<your key>")
        mapping[key] = value
    return mapping


def _split_pairs(text: str) -> Iterable[tuple[str, str]]:
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise MappingError(
                f"column_mapping: {part.strip()[:80]!r} is not field=key; write e.g. 'instruction=prompt,output=answer'")
        yield key, value


@dataclass(frozen=True)
class ChatKeys:
    """Where a sharegpt/openai row keeps its turns; the first key found wins."""

    messages: tuple[str, ...]
    role: tuple[str, ...]
    content: tuple[str, ...]
    system: str
    role_names: dict[str, str]


def chat_keys(fmt: str, mapping: dict[str, str]) -> ChatKeys:
    preferred = ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
    fallback = ("messages", "role", "content") if fmt == "sharegpt" else ("conversations", "from", "value")

    def pick(name: str, i: int) -> tuple[str, ...]:
        return (mapping[name],) if name in mapping else (preferred[i], fallback[i])

    role_names = dict(_DEFAULT_ROLE_NAMES)
    for tag, role in (("user_tag", "user"), ("assistant_tag", "assistant"), ("system_tag", "system")):
        if tag in mapping:
            role_names[mapping[tag]] = role
    return ChatKeys(pick("messages", 0), pick("role", 1), pick("content", 2),
                    mapping.get("system", "system"), role_names)


def detect_row_format(row: Any, mapping: dict[str, str]) -> str | None:
    """The format one row looks like, or None. Chat keys win over alpaca keys."""
    if not isinstance(row, dict):
        return None
    if "messages" in mapping and isinstance(row.get(mapping["messages"]), list):
        first = next(iter(row[mapping["messages"]]), {})
        return "sharegpt" if isinstance(first, dict) and "from" in first else "openai"
    if isinstance(row.get("conversations"), list):
        return "sharegpt"
    if isinstance(row.get("messages"), list):
        return "openai"
    if mapping.get("instruction", "instruction") in row and mapping.get("output", "output") in row:
        return "alpaca"
    return None


def convert_row(row: Any, fmt: str, mapping: dict[str, str]) -> list[dict[str, str]]:
    """One row as a conversation, or ``RowError``."""
    if not isinstance(row, dict):
        raise RowError("row is not a JSON object", f"got {_type_name(row)}")
    return CONVERTERS[fmt](row, mapping)


def alpaca_to_conversation(row: dict[str, Any], mapping: dict[str, str]) -> list[dict[str, str]]:
    key = {name: mapping.get(name, name) for name in ALPACA_KEYS}
    for required in ("instruction", "output"):
        if key[required] not in row:
            raise RowError(f"missing field '{key[required]}'", f"row keys: {_keys(row)}")
    instruction = _string(row, key["instruction"])
    extra = _string(row, key["input"]) if row.get(key["input"]) is not None else ""
    output = _string(row, key["output"])
    prompt = "\n\n".join(p for p in (instruction.strip() and instruction, extra.strip() and extra) if p)
    if not prompt:
        raise RowError("empty prompt", f"'{key['instruction']}' and '{key['input']}' are both empty")
    if not output.strip():
        raise RowError("empty response", f"'{key['output']}' is empty")
    conversation: list[dict[str, str]] = []
    system = row.get(key["system"])
    if system is not None:
        if not isinstance(system, str):
            raise RowError("content is not a string", f"'{key['system']}' is {_type_name(system)}")
        if system.strip():
            conversation.append({"role": "system", "content": system})
    history = row.get(key["history"])
    if history not in (None, ""):  # "": a table's empty history cell, a row without one
        if not isinstance(history, list):
            raise RowError("bad history", f"'{key['history']}' is {_type_name(history)}, expected a list of "
                                          "[user, assistant] pairs")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise RowError("bad history", f"'{key['history']}' item {i} is not a [user, assistant] pair of strings")
            if not pair[0].strip() or not pair[1].strip():
                raise RowError("bad history", f"'{key['history']}' item {i} has an empty turn")
            conversation += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    conversation += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return conversation


def _chat_to_conversation(fmt: str) -> Callable[[dict[str, Any], dict[str, str]], list[dict[str, str]]]:
    def convert(row: dict[str, Any], mapping: dict[str, str]) -> list[dict[str, str]]:
        keys = chat_keys(fmt, mapping)
        messages_key = next((k for k in keys.messages if k in row), None)
        if messages_key is None:
            raise RowError(f"missing field '{keys.messages[0]}'", f"row keys: {_keys(row)}")
        turns = row[messages_key]
        if not isinstance(turns, list):
            raise RowError("messages are not a list", f"'{messages_key}' is {_type_name(turns)}")
        if not turns:
            raise RowError("no messages", f"'{messages_key}' is an empty list")
        conversation = [_turn(turn, i, keys) for i, turn in enumerate(turns)]
        system = row.get(keys.system)
        if system is not None and not (conversation and conversation[0]["role"] == "system"):
            if not isinstance(system, str):
                raise RowError("content is not a string", f"'{keys.system}' is {_type_name(system)}")
            conversation.insert(0, {"role": "system", "content": system})
        conversation = [m for m in conversation if not (m["role"] == "system" and not m["content"].strip())]
        check_turn_order(conversation)
        return conversation

    return convert


def _turn(turn: Any, i: int, keys: ChatKeys) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise RowError("message is not an object", f"message {i} is {_type_name(turn)}")
    role_key = next((k for k in keys.role if k in turn), None)
    content_key = next((k for k in keys.content if k in turn), None)
    if role_key is None:
        raise RowError(f"missing field '{keys.role[0]}'", f"message {i} keys: {_keys(turn)}")
    raw_role = turn[role_key]
    if raw_role in TOOL_ROLES or turn.get("tool_calls") or turn.get("function_call"):  # content may be null
        what = f"a {raw_role!r} message (a tool's result)" if raw_role in TOOL_ROLES else "an assistant tool call"
        raise RowError(TOOL_CALLS_REASON, f"message {i} is {what}")
    if content_key is None:
        raise RowError(f"missing field '{keys.content[0]}'", f"message {i} keys: {_keys(turn)}")
    content = _text_parts(turn[content_key], i)
    role = keys.role_names.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        allowed = ", ".join(sorted(keys.role_names))
        raise RowError("unknown role", f"message {i} has role {raw_role!r}; allowed: {allowed} "
                                       "(map others with user_tag=/assistant_tag=)")
    if not isinstance(content, str):
        raise RowError("content is not a string", f"message {i} ({role}) content is {_type_name(content)}")
    if not content.strip() and role != "system":
        raise RowError("empty response" if role == "assistant" else "empty user message", f"message {i} is empty")
    return {"role": role, "content": content}


def _text_parts(content: Any, i: int) -> Any:
    """OpenAI's list-of-parts content (``[{"type": "text", "text": ...}]``) joined into one string."""
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        return content
    kinds = [p.get("type") for p in content]
    other = next((k for k in kinds if k != "text"), None)
    if other is not None or not all(isinstance(p.get("text"), str) for p in content):
        raise RowError("content is not a string", f"message {i} has a non-text content part {other!r}; "
                                                  "only text can be trained on")
    return "".join(p["text"] for p in content)


def check_turn_order(conversation: list[dict[str, str]]) -> None:
    """Optional system first, then user/assistant alternating from user, ending with assistant."""
    turns = conversation[1:] if conversation and conversation[0]["role"] == "system" else conversation
    if not turns:
        raise RowError("no messages", "only a system prompt")
    offset = len(conversation) - len(turns)
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            where = "must come first" if message["role"] == "system" else f"where {expected} was expected"
            raise RowError("wrong turn order", f"message {i + offset} is {message['role']} {where}")
    if turns[-1]["role"] != "assistant":
        raise RowError("wrong turn order", "the last message is from the user; it must end with an assistant reply")


def _string(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise RowError("content is not a string", f"'{key}' is {_type_name(value)}")
    return value


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _keys(row: dict[str, Any]) -> str:
    names = list(row)[:8]
    return ", ".join(map(str, names)) + (", ..." if len(row) > 8 else "") if names else "(none)"


CONVERTERS: dict[str, Callable[[dict[str, Any], dict[str, str]], list[dict[str, str]]]] = {
    "alpaca": alpaca_to_conversation,
    "sharegpt": _chat_to_conversation("sharegpt"),
    "openai": _chat_to_conversation("openai"),
}


# ----------------------------------------------------------------------------- guessing a mapping
# Key names (lower case, '_'/'-'/' ' removed) that most likely hold each part of a row, likeliest first.
_PROMPT_NAMES = ("instruction", "prompt", "question", "query", "request", "user", "human", "ask", "q", "input",
                 "source", "text")
_ANSWER_NAMES = ("output", "completion", "response", "answer", "reply", "assistant", "gpt", "bot", "target",
                 "solution", "a", "label", "result")
_CONTEXT_NAMES = ("input", "context", "passage", "document")
_SYSTEM_NAMES = ("system", "systemprompt", "sys")
_TURNS_NAMES = ("messages", "conversations", "conversation", "dialog", "dialogue", "turns", "chat", "history")
_ROLE_NAMES = ("role", "from", "speaker", "author", "sender", "who")
_CONTENT_NAMES = ("content", "value", "text", "message", "utterance", "body")


@dataclass(frozen=True)
class Reading:
    """A way to read rows that no format fits: ``fmt`` with ``column_mapping`` (``"instruction=prompt,..."``).
    The mapping may be a template with <placeholders> when the keys' names tell nothing."""

    fmt: str
    column_mapping: str

    def how(self) -> str:
        """The fix in words every client understands: the web UI's fields and the command line's flags
        and config keys (a CLI-only '--format ...' told web UI users to give flags they do not have)."""
        if not self.column_mapping:
            return (f"set Dataset format = {self.fmt} (web UI: Data options; command line: --format {self.fmt} for "
                    "check-data, dataset_format in the train config or its --set)")
        mapping = f"'{self.column_mapping}'"
        return (f"set Dataset format = {self.fmt} and Column mapping = {mapping} (web UI: Data options; command "
                f"line: --format {self.fmt} --column-mapping {mapping} for check-data, dataset_format and "
                "column_mapping in the train config or its --set)")


GENERIC_READING = Reading("alpaca", "instruction=<prompt key>,output=<answer key>")


def suggest_reading(rows: Iterable[Any]) -> Reading | None:
    """The likeliest format and column mapping for rows whose keys no format names, picked by the
    key names of the first object: ``prompt, completion`` -> alpaca ``instruction=prompt,output=completion``;
    ``Instruction, Output`` -> ``instruction=Instruction,output=Output``; a list of turn objects under
    ``dialog`` -> openai ``messages=dialog,role=...,content=...``. None when nothing looks likely."""
    row = next((r for r in rows if isinstance(r, dict) and r), None)
    if row is None:
        return None
    turns_key = _pick([k for k, v in row.items() if isinstance(v, list) and v and isinstance(v[0], dict)],
                      _TURNS_NAMES, fallback=True)
    if turns_key is not None:
        return _chat_reading(turns_key, row[turns_key])
    text_keys = [k for k, v in row.items() if isinstance(v, str)]
    prompt = _pick(text_keys, _PROMPT_NAMES)
    answer = _pick([k for k in text_keys if k != prompt], _ANSWER_NAMES)
    if (prompt is None or answer is None) and len(text_keys) == 2:  # no telling names: they come in that order
        prompt, answer = text_keys
    if prompt is None or answer is None:
        return None
    parts = {"instruction": prompt, "output": answer}
    context = _pick([k for k in text_keys if k not in (prompt, answer)], _CONTEXT_NAMES)
    system = _pick([k for k in text_keys if k not in (prompt, answer, context)], _SYSTEM_NAMES)
    parts.update({name: key for name, key in (("input", context), ("system", system)) if key is not None})
    return Reading("alpaca", _mapping_text(parts))


def _chat_reading(turns_key: str, turns: list[Any]) -> Reading | None:
    first = turns[0]
    role = _pick(list(first), _ROLE_NAMES)
    content = _pick([k for k in first if k != role], _CONTENT_NAMES)
    if role is None or content is None:
        return None
    fmt = "sharegpt" if role == "from" else "openai"
    parts = {"messages": turns_key, "role": role, "content": content}
    roles = [t.get(role) for t in turns if isinstance(t, dict) and isinstance(t.get(role), str)]
    unknown = [r for r in dict.fromkeys(roles) if r not in _DEFAULT_ROLE_NAMES]
    if unknown and len(roles) >= 2:  # the first speaker asks, the second answers
        parts.update({"user_tag": roles[0], "assistant_tag": roles[1]})
    canonical = {"messages": ("messages", "conversations"), "role": ("role", "from"), "content": ("content", "value")}
    parts = {k: v for k, v in parts.items() if v not in canonical.get(k, ())}
    return Reading(fmt, _mapping_text(parts))


def _pick(keys: list[Any], names: tuple[str, ...], fallback: bool = False) -> str | None:
    """The key whose name is likeliest to mean one of ``names`` (an exact name first, in the order of
    ``names``, then a name inside the key, such as ``user_question``); ``fallback``: else the first key."""
    plain = {key: re.sub(r"[\s_\-]", "", str(key).lower()) for key in keys}
    for name in names:
        for key in keys:
            if plain[key] == name:
                return key
    for name in (n for n in names if len(n) > 2):
        for key in keys:
            if name in plain[key]:
                return key
    return keys[0] if fallback and keys else None


def _mapping_text(parts: dict[str, str]) -> str:
    return ",".join(f"{name}={key}" for name, key in parts.items() if name != key)
