"""``python webui.py``: parse the flags, open the core services, build and launch the page.

Exposure rules: with ``--share`` (or a ``--host`` other than loopback) the app always requires a
login — from ``--auth``/``--auth-file`` or a random password printed once here — failed logins are
slowed down, and every path a user types is confined to the data home and ``configs/``. When the
share link cannot be created (no internet), this says so and the app keeps serving locally.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("sage_ft.webui")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="webui.py", description="SAGE Fine-Tune Studio: the web UI.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("SAGE_FT_PORT") or 7860), help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (login required)")
    p.add_argument("--auth", metavar="USER:PASS", help="require this login")
    p.add_argument("--auth-file", metavar="FILE", help="require a login from FILE (one user:password per line)")
    p.add_argument("--lang", choices=("en", "zh"), default=None,
                   help="language of a page opened for the first time (default: the browser's own, else English); "
                        "a language picked on the page is kept in that browser")
    p.add_argument("--no-llm", action="store_true", help="do not start the chat server")
    p.add_argument("--llm-model", metavar="MODEL", help="chat model to serve (a base model name/path or a run folder)")
    p.add_argument("--use-finetuned", nargs="?", const="latest", metavar="TASK_ID|latest",
                   help="serve a fine-tuned adapter: the newest completed run, or the given task id")
    p.add_argument("--list-finetuned", action="store_true", help="list completed fine-tuned runs and exit")
    p.add_argument("--data-home", metavar="DIR", help="data home (default $SAGE_FT_HOME or ~/.sage_ft)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.data_home:
        os.environ["SAGE_FT_HOME"] = str(Path(args.data_home).expanduser().resolve())
    stop_on_sigterm_as_on_ctrl_c()
    from sage_ft.serving.ports import bypass_proxies_for_loopback

    bypass_proxies_for_loopback()
    from sage_ft.paths import DataHomeUnavailable
    from sage_ft.tasks.store import SchemaError
    from sage_ft.webui.auth import AuthError

    try:
        return _run(args)
    except AuthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (DataHomeUnavailable, SchemaError) as exc:  # data home not writable, a newer database, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from sage_ft.paths import DataHomeUnavailable
    from sage_ft.serving.ports import LOOPBACK_HOSTS
    from sage_ft.tasks import TaskManager
    from sage_ft.tasks.store import SchemaError
    from sage_ft.webui.auth import AuthError

    if args.list_finetuned:
        return list_finetuned()
    exposed = args.share or args.host not in LOOPBACK_HOSTS
    guard = login_guard(args, exposed)
    from sage_ft.webui.app import build_app, launch_app
    from sage_ft.webui.services import AppServices
    from sage_ft.webui.uploads import PathGuard

    # The queue starts only once the app is up: an app that fails to start must not take queued runs
    # with it (they stay queued for the next start, or for `sage-ft tasks work`).
    tasks = TaskManager(start_worker=False)
    services = AppServices(tasks=tasks, guard=PathGuard.for_share() if exposed else PathGuard(),
                           default_lang=args.lang, llm_disabled=args.no_llm)
    threading.Thread(target=_ensure_demo, daemon=True, name="demo-model").start()
    try:
        if not args.no_llm:
            services.server = start_chat_server(args, tasks)  # adopts a server a crashed app left, or ends it
        else:
            end_orphaned_chat_servers()
        demo = build_app(services, args.lang)
        _, local_url, share_url = launch_app(demo, host=args.host, port=args.port, share=args.share, guard=guard,
                                             prevent_thread_lock=True)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while the page was being built
        _close(services, tasks)
        return 130
    except Exception as exc:
        _close(services, tasks)
        if isinstance(exc, (AuthError, DataHomeUnavailable, SchemaError)):
            raise  # main() says these
        print(f"error: {describe_launch_failure(exc, args)}", file=sys.stderr)
        return 1
    tasks.start_worker()
    if args.share and not share_url:
        print("\n*** Could not create a public share link (no internet connection, or the gradio tunnel is "
              f"blocked). The app keeps running locally at {local_url} with the same login. ***\n", flush=True)
    try:
        demo.block_thread()
    finally:
        _close(services, tasks)
    return 0


def stop_on_sigterm_as_on_ctrl_c() -> None:
    """SIGTERM (``kill``, systemd, docker stop) ends the app the way Ctrl-C does: Gradio's wait loop ends,
    and ``_close`` stops the chat server, the task queue and removes the download folder. Python's default
    SIGTERM ends the process on the spot, leaving the temp folder behind. The serving exit handlers,
    installed later, stop the chat server first and then chain to this one."""
    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _close(services: Any, tasks: Any) -> None:
    """Stop the chat server and the task queue, remove the download folder: each even when one before fails."""
    try:
        if services.server is not None:
            services.server.close()
    finally:
        try:
            tasks.shutdown()
        finally:
            services.shutdown()


def describe_launch_failure(exc: Exception, args: argparse.Namespace) -> str:
    """What went wrong starting the web server, and what to do (no traceback for the usual causes)."""
    where = f"{args.host}:{args.port}" if args.port else args.host
    if isinstance(exc, OSError):
        return f"cannot listen on {where} ({exc}); is another app using it? Pick another with --port"
    if "localhost is not accessible" in str(exc) or type(exc).__name__ in ("ConnectError", "ConnectTimeout",
                                                                            "ReadTimeout"):
        return (f"the app started but could not reach its own address on {where} ({type(exc).__name__}: {exc}). "
                "A firewall rule or a proxy setting that does not exempt localhost, or a machine too busy to "
                "answer within Gradio's 3-second start-up check; free the machine or fix the setting and "
                "start again. Queued runs were left queued")
    return f"the web app could not start: {type(exc).__name__}: {exc}. Queued runs were left queued"


def login_guard(args: argparse.Namespace, exposed: bool):
    """The login to require (None on loopback without --auth); prints a generated password once."""
    from sage_ft.webui.auth import LoginGuard, generate_password, parse_pair, read_auth_file

    pairs = []
    if args.auth:
        pairs.append(parse_pair(args.auth))
    if args.auth_file:
        pairs += read_auth_file(args.auth_file)
    if not pairs and exposed:
        password = generate_password()
        pairs = [("admin", password)]
        print(f"\n*** The app is reachable from other machines, so it requires a login.\n"
              f"*** user: admin   password: {password}\n"
              f"*** (shown only now; pass --auth user:pass or --auth-file FILE to choose your own)\n", flush=True)
    return LoginGuard.from_pairs(pairs) if pairs else None


def list_finetuned() -> int:
    """Fine-tuned models in the registry (runs' adapters and merged exports), newest first."""
    from sage_ft.models.registry import list_models

    tuned = [e for e in list_models() if "finetuned" in e.tags]
    if not tuned:
        print("No fine-tuned models yet (start a run in the Train tab or with `sage-ft train`).")
    for e in tuned:
        loss = f"loss {e.final_loss:.4f}" if e.final_loss is not None else ""
        print(f"{e.label:<50} {loss:<12} {e.path}")
    return 0


def chat_model_for(args: argparse.Namespace, tasks: Any) -> str:
    """What to serve: --use-finetuned (the newest fine-tune, or a task's run) > --llm-model > the demo."""
    if args.use_finetuned:
        if args.use_finetuned == "latest":
            from sage_ft.models.registry import latest_finetuned

            entry = latest_finetuned()
            if entry is not None:
                return entry.path
            log.warning("--use-finetuned: no fine-tuned model yet; serving the base model instead")
        else:
            return tasks.task(int(args.use_finetuned)).output_dir
    return args.llm_model or "demo"


def start_chat_server(args: argparse.Namespace, tasks: Any) -> Any:
    """The managed chat server, started in the background (the top bar shows its state)."""
    from sage_ft.serving import ServerManager
    from sage_ft.tasks.arbitration import ServingArbiter

    manager = ServerManager()
    # A run that will not fit beside the served model gets the memory: the server is released for it
    # and brought back afterwards (the task's events and the top bar say so).
    tasks.set_arbiter(ServingArbiter(manager))
    model = chat_model_for(args, tasks)
    threading.Thread(target=_safe_switch, args=(manager, model), daemon=True, name="chat-server-start").start()
    return manager


def end_orphaned_chat_servers() -> None:
    """With --no-llm nothing will adopt a chat server a crashed app left running: end it (by pid + start time)."""
    try:
        from sage_ft.serving import ServerManager
    except ImportError:
        return
    for pid in ServerManager.cleanup_orphans():
        log.warning("ended the chat server (pid %s) left by a previous app", pid)


def _safe_switch(manager: Any, model: str) -> None:
    try:
        manager.switch(model)
    except Exception:
        log.exception("could not start the chat server with %s", model)


def _ensure_demo() -> None:
    try:
        from sage_ft.models.demo import ensure_demo_model

        ensure_demo_model()
    except Exception:
        log.exception("could not build the demo model")
