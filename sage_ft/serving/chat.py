"""The chat path: messages in, text chunks out, through the ``openai`` client to the managed server.

``stream_chat(manager, messages, ...)`` is what the web UI's Chat tab and ``sage-ft chat`` call; it
works the same with the in-process transformers backend. Every failure becomes a ``ChatError`` whose
``retryable`` flag tells the UI whether "try again" can help (server restarting/switching) or the
request itself is wrong (unknown model, prompt too long). Every HTTP call has a timeout, so a dead
server never hangs a chat; setting ``cancel_event`` closes the stream (vLLM aborts the request).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sage_ft.serving.manager import ServerManager

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0  # longest silence between two streamed chunks


class ChatError(RuntimeError):
    """A chat request failed. ``retryable``: the same request may succeed in a few seconds.
    ``context_overflow``: the conversation is longer than the model reads (``fit_to_context`` helps)."""

    def __init__(self, message: str, retryable: bool = False, context_overflow: bool = False):
        super().__init__(message)
        self.retryable = retryable
        self.context_overflow = context_overflow


def fit_to_context(messages: list[dict[str, str]], count_tokens: Callable[[list[dict[str, str]]], int],
                   context: int, reply_room: int) -> tuple[list[dict[str, str]], int]:
    """``messages`` without their oldest turns, so that the prompt leaves ``reply_room`` of the
    model's ``context`` tokens for the reply; returns (messages, turns left out).

    A long chat would otherwise fail on every message once it outgrows the context, until the user
    clears it. The system prompt and the last user message are always kept; a turn (a user message
    and the replies to it) is left out whole, so roles still alternate as chat templates expect.
    When even those two do not fit, the reply gets what is left of the context; when they alone
    exceed it, ``ChatError`` says by how much. ``count_tokens`` is called once for a chat that
    fits, O(log turns) times for one that does not.
    """
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    cuts = sorted({0, *(i for i, m in enumerate(body) if m["role"] == "user")})
    fits = [None] * len(cuts)  # prompt tokens when the turns before cut k are left out, as measured

    def prompt_tokens(k: int) -> int:
        if fits[k] is None:
            fits[k] = count_tokens(head + body[cuts[k]:])
        return fits[k]

    if prompt_tokens(0) + reply_room <= context:  # the usual case: it fits whole, one count
        return messages, 0
    low, high = 0, len(cuts) - 1  # the fewest turns left out that leave room for the reply
    while low < high:
        mid = (low + high) // 2
        if prompt_tokens(mid) + reply_room <= context:
            high = mid
        else:
            low = mid + 1
    if prompt_tokens(low) >= context:
        raise ChatError(f"the message{' with the system prompt' if head else ''} is {prompt_tokens(low):,} tokens; "
                        f"the model reads at most {context:,} (its context length): shorten it")
    left_out = body[:cuts[low]]
    return head + body[cuts[low]:], sum(1 for m in left_out if m["role"] == "user") or len(left_out)


def build_messages(messages: list[dict[str, Any]], system_prompt: str | None = None) -> list[dict[str, str]]:
    """Validate chat messages and put ``system_prompt`` first (replacing any system message given)."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("no messages to send; give a list like [{'role': 'user', 'content': 'Hello'}]")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise ChatError(f"message {i} must be a dict with role system/user/assistant and content; got {msg!r:.80}")
        content = msg.get("content")
        if not isinstance(content, str):
            raise ChatError(f"message {i} ({msg['role']}): content must be text, got {type(content).__name__}")
        if system_prompt and msg["role"] == "system":
            continue
        out.append({"role": msg["role"], "content": content})
    if system_prompt:
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


_CLIENTS: dict[tuple[str, str], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def openai_client(base_url: str, api_key: str):
    """One client (and HTTP connection pool) per server start; no automatic retries (we report instead)."""
    with _CLIENTS_LOCK:
        client = _CLIENTS.get((base_url, api_key))
        if client is None:
            # the client's own Timeout class: openai 3.6x moved from httpx to httpx2
            from openai import OpenAI, Timeout

            timeout = Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, write=30.0, pool=CONNECT_TIMEOUT_S)
            client = _CLIENTS[(base_url, api_key)] = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout,
                                                            max_retries=0)
        return client


def _stopped_mid_reply() -> ChatError:
    return ChatError("the chat server stopped answering mid-reply; it may have been switched or restarted — "
                     "send the message again", retryable=True)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP errors a stream can raise unwrapped: those of httpx (openai < 3.6x) and of httpx2 (newer
    openai releases), whichever are installed."""
    import importlib

    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).HTTPError)
        except ImportError:
            continue
    return tuple(found)


def forget_client(base_url: str) -> None:
    """Close the pooled connections to a server that stopped (no file descriptors leak across switches)."""
    with _CLIENTS_LOCK:
        stale = [key for key in _CLIENTS if key[0] == base_url]
        clients = [_CLIENTS.pop(key) for key in stale]
    for client in clients:
        try:
            client.close()
        except Exception:  # closing is best effort
            pass


def stream_openai(base_url: str, api_key: str, model: str, messages: list[dict[str, str]], *,
                  temperature: float = 0.7, top_p: float = 1.0, max_tokens: int = 256,
                  stop: list[str] | str | None = None,
                  cancel_event: threading.Event | None = None) -> Iterator[str]:
    """Stream the reply of an OpenAI-compatible server; errors become ``ChatError``."""
    import openai

    client = openai_client(base_url, api_key)
    try:
        stream = client.chat.completions.create(model=model, messages=messages, stream=True,
                                                temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                                stop=stop or None)
    except openai.APIError as exc:
        raise _chat_error(exc, model) from None
    try:
        for chunk in stream:
            if cancel_event is not None and cancel_event.is_set():
                return
            if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content
    except openai.APIError as exc:  # newer openai releases wrap a connection lost mid-answer
        lost = isinstance(exc, openai.APIConnectionError) and not isinstance(exc, openai.APITimeoutError)
        raise (_stopped_mid_reply() if lost else _chat_error(exc, model)) from None
    except Exception as exc:  # older ones let the transport's error through (server killed mid-answer)
        if isinstance(exc, _transport_errors()):
            raise _stopped_mid_reply() from None
        raise
    finally:
        stream.close()  # closing the response makes vLLM abort the request (cancellation)


def _chat_error(exc: Exception, model: str) -> ChatError:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return ChatError(f"the chat server did not answer within {READ_TIMEOUT_S:.0f} s; try again", retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        return ChatError("the chat server is not reachable (it may be restarting or switching models); "
                         "try again in a few seconds", retryable=True)
    if isinstance(exc, openai.APIStatusError):
        detail = _status_detail(exc)
        if exc.status_code == 404:
            return ChatError(f"model {model!r} is not served right now ({detail}); switch to it first")
        if exc.status_code == 401:
            return ChatError("the chat server refused our API key (it was restarted by another process?); "
                             "restart the chat server", retryable=True)
        if exc.status_code == 400 and "context length" in detail.lower():
            return ChatError(f"the conversation is longer than the model reads ({detail})", context_overflow=True)
        if exc.status_code >= 500:
            return ChatError(f"the chat server failed ({exc.status_code}: {detail}); try again", retryable=True)
        return ChatError(f"the chat request was refused ({exc.status_code}): {detail}")
    # e.g. vLLM's "EngineCore encountered an issue. See stack trace (above) for the root cause." when the
    # server is stopped mid-reply: the first sentence is what it knows; there is no stack trace "above" here.
    first = str(exc).split(". See stack trace")[0].splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return ChatError(f"the chat server ended this reply with an error ({first}); if it was stopped or restarted, "
                     "send the message again", retryable=True)


def _status_detail(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:400]
        if isinstance(body.get("message"), str):
            return body["message"][:400]
    return str(exc)[:400]


def stream_chat(manager: ServerManager, messages: list[dict[str, Any]], model: str | None = None,
                system_prompt: str | None = None, temperature: float = 0.7, top_p: float = 1.0,
                max_tokens: int = 256, stop: list[str] | str | None = None,
                cancel_event: threading.Event | None = None,
                on_route: Callable[[str], None] | None = None,
                on_fit: Callable[[int, int], None] | None = None) -> Iterator[str]:
    """Stream a reply from ``manager``'s current model (or ``model``: a served name or label).

    Yields text chunks; raises ``ChatError`` (with ``retryable``). The function the Chat tab calls.
    ``on_route(label)`` is called once, before the first chunk, with the name of the model that answers;
    ``on_fit(turns, context)`` when the oldest ``turns`` were left out to fit the model's context.
    """
    return manager.stream_chat(messages, model=model, system_prompt=system_prompt, temperature=temperature,
                               top_p=top_p, max_tokens=max_tokens, stop=stop, cancel_event=cancel_event,
                               on_route=on_route, on_fit=on_fit)


def chat(manager: ServerManager, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """The whole reply as one string (same arguments as ``stream_chat``)."""
    return "".join(stream_chat(manager, messages, **kwargs))
