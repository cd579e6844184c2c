"""``sage-ft models list|add`` and ``sage-ft gpu``: the model registry and the device/memory check."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's commands to the `sage-ft` parser."""
    models = sub.add_parser("models", help="list base and fine-tuned models, add a local model directory")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION")
    lst = msub.add_parser("list", help="every model: demo, configured, local, HF cache, fine-tunes, exports")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.add_argument("--kind", choices=("base", "lora", "merged"), help="only this kind")
    lst.add_argument("--finetuned", action="store_true", help="only fine-tuned models (LoRA and merged)")
    lst.add_argument("--checkpoints", action="store_true", help="also list each LoRA run's checkpoints")
    lst.set_defaults(handler=_list)
    add = msub.add_parser("add", help="validate a local model directory and add it to the list")
    add.add_argument("path", help="directory with config.json, weights and tokenizer files")
    add.add_argument("--name", help="display name (default: the directory name)")
    add.set_defaults(handler=_add)
    models.set_defaults(handler=lambda args: models.print_help() or 2)

    gpu = sub.add_parser("gpu", help="devices (GPUs or CPU/RAM) and whether a training config fits")
    gpu.add_argument("--json", action="store_true", help="machine-readable output")
    gpu.add_argument("--config", help="training YAML to estimate memory for and get recommended settings")
    gpu.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    gpu.add_argument("--model", help="model directory to estimate with (default: the config's model)")
    gpu.set_defaults(handler=_gpu)


def _list(args: argparse.Namespace) -> int:
    from sage_ft.models.registry import list_models

    entries = list_models(include_checkpoints=args.checkpoints, kind=args.kind)
    if args.finetuned:
        entries = [e for e in entries if "finetuned" in e.tags]
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2, default=str))
        return 0
    if not entries:
        print("no models")
        return 0
    width = max(len(e.label) for e in entries)
    for e in entries:
        size = _size(e.size_bytes)
        facts = [size]
        if e.base_model:
            facts.append(f"base {e.base_model}")
        if e.final_loss is not None:
            facts.append(f"loss {e.final_loss:.4f}")
        if e.dataset:
            facts.append(f"data {_dataset_text(e.dataset)}")
        if e.note:
            facts.append(e.note)
        print(f"{e.label:<{width}}  {e.path}\n{'':<{width}}  " + " · ".join(facts))
        for step, path in e.checkpoints:
            print(f"{'':<{width}}    checkpoint {step}: {path}")
    return 0


def _dataset_text(dataset: Any) -> str:
    """A run's dataset as a person reads it: ``a.jsonl, b.csv`` (not ``['a.jsonl', 'b.csv']``).

    Runs record a list of paths; exports copy whatever their run recorded (a list, a path, or a
    ``{"path": ..., "rows": ...}`` object from older runs).
    """
    if isinstance(dataset, (list, tuple)):
        return ", ".join(_dataset_text(item) for item in dataset)
    if isinstance(dataset, dict):
        name = dataset.get("path") or dataset.get("name") or dataset.get("files")
        rest = ", ".join(f"{k} {v}" for k, v in dataset.items() if k not in ("path", "name", "files"))
        if name:
            return _dataset_text(name) + (f" ({rest})" if rest else "")
        return rest
    return str(dataset)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _add(args: argparse.Namespace) -> int:
    from sage_ft.models.registry import add_local_model
    from sage_ft.models.resolve import ModelError

    try:
        entry = add_local_model(args.path, name=args.name)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"added {entry.label}: {entry.path}")
    return 0


def _gpu(args: argparse.Namespace) -> int:
    from sage_ft.gpu import device_info, summary

    info = device_info()
    out: dict[str, Any] = {"device": info}
    if args.config or args.set or args.model:
        from sage_ft.config import ConfigError, TrainConfig, parse_overrides
        from sage_ft.estimate import EstimateError, check_fit, recommend
        from sage_ft.models.resolve import ModelError

        try:
            if args.config:
                config, _ = TrainConfig.from_yaml(args.config, args.set)
            else:
                config, _ = TrainConfig.from_dict(parse_overrides(args.set))
            fit = check_fit(config, args.model, info)
            rec = recommend(config, args.model, info)
        except (ConfigError, EstimateError, ModelError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        out.update(fit=fit.to_dict(), recommendation=rec.to_dict())
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(summary(info))
    if "fit" in out:
        print()
        print(fit.estimate.describe())
        print("fits" if fit.fits else fit.warning)
        if rec.fits and rec.changes:
            print("recommended: " + ", ".join(f"{k}={v}" for k, v in rec.changes.items()))
            print("  " + "\n  ".join(rec.reasons))
        elif not rec.fits:
            print(rec.reasons[0])
    return 0
