"""``sage-ft serve`` / ``chat`` / ``switch``: the managed chat server from a terminal.

``serve`` runs in the foreground and prints the OpenAI base URL, served model name and API key once
the server is verified ready; Ctrl-C or SIGTERM stops the child cleanly. ``chat`` talks to the server
a running sage-ft process serves (found through the registry file), else starts one for the session.
``switch`` changes the model of a server this command starts or adopts.
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
                       help="model dir/name, run dir or name, task id or name, checkpoint-N dir or 'demo'")
    serve.add_argument("--port", type=int, default=None, help="preferred port (default SAGE_FT_LLM_PORT or 8001)")
    serve.add_argument("--max-model-len", type=_context_arg, default=None, metavar="TOKENS|auto",
                       help="context length served (default auto: the model's own, as far as KV-cache memory holds)")
    serve.add_argument("--max-lora-rank", type=int, default=16)
    serve.add_argument("--timeout", type=float, default=600.0, help="start-up timeout in seconds")
    serve.set_defaults(handler=_serve)

    chat = sub.add_parser("chat", help="chat with the current model in the terminal")
    chat.add_argument("--model", default=None, type=_model_arg,
                      help="model to switch to first, as for switch (default: what is served)")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.set_defaults(handler=_chat)

    switch = sub.add_parser("switch", help="switch the chat model (adapter at runtime, or a new server)")
    switch.add_argument("model", type=_model_arg,
                        help="model dir/name, run dir or name, task id (7 or #7) or name, checkpoint-N dir or merged model dir")
    switch.add_argument("--json", action="store_true", help="print the SwitchResult as JSON")
    switch.set_defaults(handler=_switch)


def _model_arg(text: str) -> str:
    """A model argument; a task id (``7`` or ``#7``, as `sage-ft tasks list` shows) or name means its run."""
    from sage_ft.tasks import TaskNotFound, task_run_dir

    try:
        run_dir = task_run_dir(text)
    except TaskNotFound as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return str(run_dir) if run_dir else text


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


def _progress(item) -> None:
    print(f"  {item}", file=sys.stderr, flush=True)


def _serve(args: argparse.Namespace) -> int:
    from sage_ft.serving import ServerManager, ServerStartError

    manager = ServerManager(args.model, port=args.port, max_model_len=args.max_model_len,
                            max_lora_rank=args.max_lora_rank)
    print(f"starting the chat server for {args.model} ({manager.backend}) ...", file=sys.stderr, flush=True)
    try:
        served = manager.start(progress=_progress, timeout_s=args.timeout)
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.log_tail:
            print(exc.log_tail, file=sys.stderr)
        return 1
    endpoint = manager.endpoint()
    if endpoint is None:
        print(f"serving {served.label} in-process ({manager.status()['backend_reason']}); no HTTP API. "
              "Use `sage-ft chat` instead.", file=sys.stderr)
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
                print(f"error: the chat server {status['state']}: {status['last_error']}\n{status['log_tail']}",
                      file=sys.stderr)
                return 1
            endpoint = manager.endpoint() if status["state"] == "ready" else None
            if endpoint is not None and _endpoint_text(manager, endpoint) != shown:  # `sage-ft switch` changed it
                shown = _endpoint_text(manager, endpoint)
                print(f"the chat model changed ({status['message']}); clients now use:\n{shown}", flush=True)
    except KeyboardInterrupt:
        print("stopping ...", file=sys.stderr)
    finally:
        manager.close()
    return 0


def _endpoint_text(manager, endpoint: dict) -> str:
    """What an OpenAI client needs, one ``key: value`` per line (scripts read them)."""
    status = manager.status()
    context = status["context_len"]
    return "\n".join([f"base URL:   {endpoint['base_url']}", f"model:      {endpoint['model']}",
                      f"context:    {f'{context:,}' if context else '?'} tokens",
                      f"API key:    {endpoint['api_key']}", f"log:        {status['log_path']}"])


def _manager_for_terminal(model: str | None):
    """The running server another sage-ft process serves, else one we start for this session."""
    from sage_ft.serving import ServerManager

    manager = ServerManager.connect_existing()
    if manager is None:
        manager = ServerManager(model or "demo")
        print(f"no running chat server found; starting one ({manager.backend}) ...", file=sys.stderr)
        manager.start(progress=_progress)
    if model:
        attached = manager.attached
        result = _owner_switch(model) if attached else manager.switch(model, progress=_progress)
        print(f"{result.icon} {result.summary}" if result else "⚠️ the chat server has stopped", file=sys.stderr)
        if result is None or result.outcome == "failed":
            raise SystemExit(1)
        if attached:
            manager = ServerManager.connect_existing() or manager
    return manager


def _follow_the_app(manager):
    """A terminal chat attached to the app's server answers with what the app serves now (its Chat tab
    may have switched since the last message), and says so when that changed."""
    from sage_ft.serving import ServerManager

    fresh = ServerManager.connect_existing()
    if fresh is None or fresh.current is None:
        return manager  # the app's server is gone or restarting: the chat request says so
    before = manager.current
    if before is None or (fresh.current.name, fresh.current.port) != (before.name, before.port):
        print(f"(the app now serves {fresh.current.label}; it answers from here on)", file=sys.stderr)
    return fresh


def _chat(args: argparse.Namespace) -> int:
    from sage_ft.serving import ChatError, ServerStartError

    try:
        manager = _manager_for_terminal(args.model)
    except (ServerStartError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    current = manager.current
    print(f"chatting with {current.label if current else '?'} ({manager.backend}); /quit to leave, "
          "/reset to clear the history", file=sys.stderr)
    history: list[dict[str, str]] = []
    try:
        for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("you> "), None):
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
            history.append({"role": "user", "content": text})
            reply = ""
            try:
                for chunk in manager.stream_chat(history, system_prompt=args.system, temperature=args.temperature,
                                                 max_tokens=args.max_tokens, on_fit=_say_left_out):
                    reply += chunk
                    print(chunk, end="", flush=True)
            except ChatError as exc:
                print(f"\nerror: {exc}" + (" (retry)" if exc.retryable else ""), file=sys.stderr)
                history.pop()
                continue
            print(flush=True)
            history.append({"role": "assistant", "content": reply})
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        manager.close()
    return 0


def _say_left_out(turns: int, context: int) -> None:
    print(f"({turns} oldest turn(s) not sent: the chat outgrew the model's {context:,}-token context; "
          "/reset starts afresh)", file=sys.stderr, flush=True)


def _switch(args: argparse.Namespace) -> int:
    try:
        result = _owner_switch(args.model)
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result is None:
        print(f"⚠️ no chat server is running; `sage-ft serve --model {args.model}` starts one with this model",
              file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"{result.icon} {result.summary}")
        print("timings: " + ", ".join(f"{k}={v:.2f}" for k, v in result.timings.items()))
    return 0 if result.outcome == "live" else 1


def _owner_switch(model: str):
    """The switch done by the process that serves the chat model (the app), so that its Chat tab and
    every other client follow; None when no other process serves one."""
    from sage_ft.serving import ServerManager

    print(f"asking the process that serves the chat model to switch to {model} ...", file=sys.stderr, flush=True)
    return ServerManager.ask_owner_to_switch(model, progress=_progress)
