"""``sage-ft serve`` / ``chat`` / ``switch``: the managed chat server from a terminal.

``serve`` runs in the foreground and prints the OpenAI base URL, served model name and API key once
the server is verified ready; Ctrl-C or SIGTERM stops the child cleanly. It refuses to start a second
server next to one another sage-ft process serves (``--another`` does), and ``--stop-orphans`` ends
the servers whose sage-ft process was killed. ``chat`` talks to the server a running sage-ft process
serves (found through the registry file), else starts one for the session. ``switch`` has the process
that serves switch its model. With several serving, ``--port`` names the one; they always say which.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's commands to the `sage-ft` parser."""
    serve = sub.add_parser("serve", help="run the chat server in the foreground (OpenAI-compatible API)")
    serve.add_argument("--model", default="demo", type=_model_arg,
                       help="model dir/name, run dir or name, export name, task id or name, checkpoint-N dir "
                            "or 'demo'")
    serve.add_argument("--port", type=int, default=None, help="preferred port (default SAGE_FT_LLM_PORT or 8001)")
    serve.add_argument("--max-model-len", type=_context_arg, default=None, metavar="TOKENS|auto",
                       help="context length served (default auto: the model's own, as far as KV-cache memory holds)")
    serve.add_argument("--max-lora-rank", type=int, default=16)
    serve.add_argument("--timeout", type=float, default=600.0, help="start-up timeout in seconds")
    serve.add_argument("--another", action="store_true",
                       help="start a server even though another sage-ft process (the web app) already serves one")
    serve.add_argument("--stop-orphans", action="store_true",
                       help="end the chat servers whose sage-ft process was killed (kill -9, crash), then exit")
    serve.set_defaults(handler=_serve)

    chat = sub.add_parser("chat", help="chat with the current model in the terminal")
    chat.add_argument("--model", default=None, type=_model_arg,
                      help="model to switch to first, as for switch (default: what is served)")
    chat.add_argument("--port", type=int, default=None,
                      help="the server to chat with when several sage-ft processes serve one (its port)")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.set_defaults(handler=_chat)

    switch = sub.add_parser("switch", help="switch the chat model (adapter at runtime, or a new server)")
    switch.add_argument("model", type=_model_arg,
                        help="model dir/name, run dir or name, export name, task id (7 or #7) or name, "
                             "checkpoint-N dir or merged model dir")
    switch.add_argument("--port", type=int, default=None,
                        help="the server to switch when several sage-ft processes serve one (its port)")
    switch.add_argument("--json", action="store_true", help="print the SwitchResult as JSON")
    switch.set_defaults(handler=_switch)


def _model_arg(text: str) -> str:
    """A model argument, checked early where it names a task that does not exist (``#99``) or several;
    what it stands for is resolved by the core (``serving.targets.resolve_target``), as for every client."""
    from sage_ft.serving import TargetError
    from sage_ft.serving.targets import named_model

    try:
        named_model(text)
    except TargetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _context_arg(text: str) -> int | None:
    """``--max-model-len``: a positive number of tokens, or ``auto`` (None: vLLM chooses)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of tokens (e.g. 4096) or 'auto'")
    return value


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _progress(item) -> None:
    _say(f"  {item}")


def _serve(args: argparse.Namespace) -> int:
    from sage_ft.serving import ServerManager, ServerStartError, registry

    if args.stop_orphans:
        return _stop_orphans()
    others = registry.served_by_others()
    if others and not args.another:
        _say("error: another sage-ft process already serves a chat model: process "
             + "; ".join(registry.describe(e) for e in others)
             + ".\nUse it (`sage-ft chat`, `sage-ft switch MODEL`, or its URL with the API key in the app's "
               "Chat tab), or pass --another to start a second server beside it.")
        return 1
    manager = ServerManager(args.model, port=args.port, max_model_len=args.max_model_len,
                            max_lora_rank=args.max_lora_rank)
    _say(f"starting the chat server for {args.model} ({manager.backend}) ...")
    try:
        served = manager.start(progress=_progress, timeout_s=args.timeout)
    except ServerStartError as exc:
        _say(f"error: {exc}")
        if exc.log_tail:
            _say(exc.log_tail)
        return 1
    endpoint = manager.endpoint()
    if endpoint is None:
        _say(f"serving {served.label} in-process ({manager.status()['backend_reason']}); no HTTP API. "
             "Use `sage-ft chat` instead.")
        manager.close()
        return 1
    shown = _endpoint_text(manager, endpoint)
    print(shown)
    print("Ctrl-C stops the server.", flush=True)
    stop = threading.Event()
    try:
        while not stop.wait(1.0):
            status = manager.status()
            if status["state"] in ("crashed", "stopped"):  # stopped: a stop-then-start switch that failed
                _say(f"error: {status['last_error'] or 'the chat server ' + status['state']}\n{status['log_tail']}")
                return 1
            endpoint = manager.endpoint() if status["state"] == "ready" else None
            if endpoint is not None and _endpoint_text(manager, endpoint) != shown:  # `sage-ft switch` changed it
                shown = _endpoint_text(manager, endpoint)
                print(f"the chat model changed ({status['message']}); clients now use:\n{shown}", flush=True)
    except KeyboardInterrupt:
        _say("stopping ...")
    finally:
        manager.close()
    return 0


def _stop_orphans() -> int:
    """End the vLLM servers of this data home whose sage-ft process is gone (checked by pid + start time)."""
    from sage_ft.serving import ServerManager

    ended = ServerManager.cleanup_orphans()
    for pid in ended:
        print(f"ended the chat server pid {pid} (its sage-ft process had ended)", flush=True)
    if not ended:
        print("no chat server without its sage-ft process; nothing to end", flush=True)
    return 0


def _endpoint_text(manager, endpoint: dict) -> str:
    """What an OpenAI client needs, one ``key: value`` per line (scripts read them)."""
    status = manager.status()
    context = status["context_len"]
    return "\n".join([f"base URL:   {endpoint['base_url']}", f"model:      {endpoint['model']}",
                      f"context:    {f'{context:,}' if context else '?'} tokens",
                      f"API key:    {endpoint['api_key']}", f"log:        {status['log_path']}"])


def _manager_for_terminal(model: str | None, port: int | None):
    """The running server another sage-ft process serves (the one on ``port``), else one we start for
    this session (with ``model``, so it is not switched to a second time)."""
    from sage_ft.serving import ServerManager

    manager = ServerManager.connect_existing(port=port)
    if manager is None:
        if port is not None:
            raise LookupError(f"no sage-ft process serves a chat model on port {port}")
        manager = ServerManager(model or "demo")
        _say(f"no running chat server found; starting one ({manager.backend}) ...")
        manager.start(progress=_progress)
        if model:
            _say(f"✅ {manager.status()['message']}")
        return manager
    _say(f"attached to {_served_by(manager)}")
    if model:
        result = _owner_switch(model, owner_pid=manager.owner_pid)
        _say(f"{result.icon} {result.summary}" if result else "⚠️ the chat server has stopped")
        if result is None or result.outcome == "failed":
            raise SystemExit(1)
        manager = ServerManager.connect_existing(owner_pid=manager.owner_pid) or manager
    return manager


def _served_by(manager) -> str:
    """Which server a terminal chat talks to: model, port and the sage-ft process that owns it."""
    current, status = manager.current, manager.status()
    return (f"{current.label if current else '?'} on port {status['port']} (served by the sage-ft process "
            f"pid {manager.owner_pid})")


def _follow_the_app(manager):
    """A terminal chat attached to the app's server answers with what the app serves now (its Chat tab
    may have switched since the last message), and says so when that changed."""
    from sage_ft.serving import ServerManager
    from sage_ft.serving.registry import ServerChoiceError

    try:
        fresh = ServerManager.connect_existing(owner_pid=manager.owner_pid)
    except ServerChoiceError:
        fresh = None
    if fresh is None or fresh.current is None:
        return manager  # the app's server is gone or restarting: the chat request says so
    before = manager.current
    if before is None or (fresh.current.name, fresh.current.port) != (before.name, before.port):
        _say(f"(the app now serves {fresh.current.label}; it answers from here on)")
    return fresh


def _prompts():
    """The lines typed (``you> `` prompt on a terminal) or piped in."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        yield input("you> ")


def _chat(args: argparse.Namespace) -> int:
    from sage_ft.serving import ServerStartError
    from sage_ft.serving.registry import ServerChoiceError

    try:
        manager = _manager_for_terminal(args.model, args.port)
    except (ServerStartError, TimeoutError, ServerChoiceError, LookupError) as exc:
        _say(f"error: {exc}")
        return 1
    current = manager.current
    _say(f"chatting with {current.label if current else '?'} ({manager.backend}); /quit or Ctrl-D to leave, "
         "/reset to clear the history, Ctrl-C stops a reply")
    history: list[dict[str, str]] = []
    code = 0
    try:
        for line in _prompts():
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                break
            if text == "/reset":
                history.clear()
                continue
            if manager.attached:  # another sage-ft process serves: answer with what it serves now
                manager = _follow_the_app(manager)
            _reply(manager, history, text, args)
    except EOFError:
        pass
    except KeyboardInterrupt:  # at the prompt: the session ends (a reply in progress only stops, in _reply)
        _say("")
        code = 130
    finally:
        manager.close()
    return code


def _reply(manager, history: list[dict[str, str]], text: str, args: argparse.Namespace) -> None:
    """Stream one reply to stdout and keep the turn in ``history``; Ctrl-C stops the reply, not the session."""
    from sage_ft.serving import ChatError

    history.append({"role": "user", "content": text})
    cancel = threading.Event()
    reply = ""
    stream = manager.stream_chat(history, system_prompt=args.system, temperature=args.temperature,
                                 max_tokens=args.max_tokens, cancel_event=cancel, on_fit=_say_left_out)
    try:
        for chunk in stream:
            reply += chunk
            print(chunk, end="", flush=True)
    except ChatError as exc:
        print(flush=True)
        _say(f"error: {exc}" + (" (retry)" if exc.retryable else ""))
        history.pop()
        return
    except KeyboardInterrupt:
        cancel.set()
        stream.close()  # closes the HTTP stream: the server stops generating
        print(flush=True)
        _say("(reply stopped; Ctrl-C again at the prompt, or Ctrl-D, ends the chat)")
    else:
        print(flush=True)
    history.append({"role": "assistant", "content": reply})


def _say_left_out(turns: int, context: int) -> None:
    _say(f"({turns} oldest turn(s) not sent: the chat outgrew the model's {context:,}-token context; "
         "/reset starts afresh)")


def _switch(args: argparse.Namespace) -> int:
    from sage_ft.serving.registry import ServerChoiceError

    try:
        result = _owner_switch(args.model, port=args.port)
    except (TimeoutError, ServerChoiceError) as exc:
        _say(f"error: {exc}")
        return 1
    if result is None:
        _say(f"⚠️ no chat server is running; `sage-ft serve --model {args.model}` starts one with this model")
        return 3
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"{result.icon} {result.summary}")
        print("timings: " + ", ".join(f"{k}={v:.2f}" for k, v in result.timings.items()), flush=True)
    return 0 if result.outcome == "live" else 1


def _owner_switch(model: str, port: int | None = None, owner_pid: int | None = None):
    """The switch done by the process that serves the chat model (the app), so that its Chat tab and
    every other client follow; None when no other process serves one. Says which process and port."""
    from sage_ft.serving import ServerManager
    from sage_ft.serving.registry import describe, pick_served

    entry = pick_served(port=port, owner_pid=owner_pid)
    if entry is None:
        return None
    _say(f"asking the sage-ft process {describe(entry)} to switch to {model} ...")
    result = ServerManager.ask_owner_to_switch(model, progress=_progress, owner_pid=entry.get("owner_pid"))
    if result is not None and result.served is not None and result.outcome == "live":
        _say(f"served by the sage-ft process pid {entry.get('owner_pid')} on port {result.served.port}")
    return result
