"""Serving: the managed vLLM chat server, model switching, the transformers fallback and the chat path.

Public API (the web UI's Chat tab, the CLI and the tests call only these)::

    from sage_ft.serving import ServerManager, SwitchResult, ServedModel, ChatError, stream_chat

    manager = ServerManager()                     # backend: vLLM when installed, else in-process transformers
    manager.start("demo", progress=print)         # verified ready; progress: StartProgress(stage, elapsed_s, ...)
    result = manager.switch("runs/my-run")        # SwitchResult(outcome live|restart_needed|failed|cancelled, ...)
    manager.cancel_switch()                       # from another thread: ends a switch's merge/start/load
    for chunk in stream_chat(manager, [{"role": "user", "content": "Hi"}], temperature=0.7):
        print(chunk, end="")
    manager.status()                              # state, backend, model, adapters, port, pid, log ...
    manager.close()

Heavy libraries are imported lazily; importing this package is cheap.
"""

from sage_ft.serving.chat import ChatError, chat, stream_chat
from sage_ft.serving.exit_handlers import stop_all_servers
from sage_ft.serving.manager import (
    DISABLE_VLLM_ENV,
    ServedModel,
    ServerManager,
    SwitchResult,
    vllm_available,
)
from sage_ft.serving.registry import ServerChoiceError
from sage_ft.serving.targets import ModelTarget, TargetError, resolve_target
from sage_ft.serving.vllm_server import ServerStartError, StartProgress

__all__ = [
    "DISABLE_VLLM_ENV", "ChatError", "ModelTarget", "ServedModel", "ServerManager", "ServerStartError",
    "ServerChoiceError", "StartProgress", "SwitchResult", "TargetError", "chat", "resolve_target", "stop_all_servers", "stream_chat",
    "vllm_available",
]
