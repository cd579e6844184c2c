"""Export tab: merge a fine-tune's LoRA into its base (dtype, shard size, target inside the data
home, overwrite), verify it, optionally write a GGUF file and a zip for download.

The work runs in the export core (``merge_lora``, ``convert_to_gguf``, ``zip_export``) on a
background thread owned by the app, one export at a time; the handler only streams its progress, so
a closed browser never stops or hangs an export, and Cancel reaches the core's cancel event. The
merged model lands in ``<data home>/exports/`` where the model registry lists it as [merged].
"""

from __future__ import annotations

import html
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from sage_ft import paths
from sage_ft.webui import chat_tab, i18n
from sage_ft.webui.components import Registry
from sage_ft.webui.services import AppServices
from sage_ft.webui.uploads import PathGuard, PathRefused

log = logging.getLogger(__name__)

GGUF_NONE = "none"
TARGET_NAME_MAX = 100  # characters: a folder name well inside every file system's 255-byte limit
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class ExportJob:
    """One export running (or finished) in this app; read by the handler that streams its progress."""

    source: str
    cancel: threading.Event = field(default_factory=threading.Event)
    stage: str = "checking"
    fraction: float = 0.0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    result: Any = None  # ExportResult
    gguf: Any = None  # GGUFExport
    zip_path: Path | None = None
    error: str | None = None
    refused: bool = False  # the error came before anything was loaded or written (a check said no)
    cancelled: bool = False
    cancel_note: str = ""  # what the core said when it stopped (what was not written)
    part_seconds: dict[str, float] = field(default_factory=dict)  # merge / gguf / zip -> seconds
    thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


_JOBS: dict[int, ExportJob] = {}  # id(AppServices) -> its latest export


def build(reg: Registry, services: AppServices, lang: str) -> None:
    from sage_ft.export import DTYPES, GGUF_OUTTYPES
    from sage_ft.export.merge import DEFAULT_SHARD_SIZE

    reg.add("export.intro", gr.Markdown(i18n.t("export.intro", lang)))
    with gr.Row(equal_height=True):
        reg.add("export.source", gr.Dropdown(choices=source_choices(services), value=None, allow_custom_value=True,
                                             label=i18n.t("export.source", lang), scale=5, elem_id="export-source",
                                             info=i18n.t("export.source.info", lang)), kind="label_info")
        reg.add("export.refresh", gr.Button(i18n.t("chat.refresh", lang), scale=0, min_width=60), key="chat.refresh")
    with gr.Row():
        reg.add("export.dtype", gr.Dropdown(choices=list(DTYPES), value="auto", label=i18n.t("export.dtype", lang)))
        reg.add("export.shard_size", gr.Textbox(value=DEFAULT_SHARD_SIZE, label=i18n.t("export.shard_size", lang)))
        reg.add("export.target", gr.Textbox(value="", label=i18n.t("export.target", lang), elem_id="export-target",
                                            info=i18n.t("export.target.info", lang)), kind="label_info")
    with gr.Row():
        reg.add("export.gguf", gr.Dropdown(choices=[GGUF_NONE, *GGUF_OUTTYPES], value=GGUF_NONE,
                                           label=i18n.t("export.gguf", lang), info=i18n.t("export.gguf.info", lang)),
                kind="label_info")
        reg.add("export.overwrite", gr.Checkbox(value=False, label=i18n.t("export.overwrite", lang)))
        reg.add("export.verify", gr.Checkbox(value=True, label=i18n.t("export.verify", lang)))
        reg.add("export.zip", gr.Checkbox(value=False, label=i18n.t("export.zip", lang)))
    with gr.Row():
        reg.add("export.start", gr.Button(i18n.t("export.start", lang), variant="primary", elem_id="export-start",
                                          scale=3))
        # on only while this app's export runs (``cancel_button``)
        reg.add("export.cancel", gr.Button(i18n.t("export.cancel", lang), variant="stop", scale=1, interactive=False,
                                           elem_id="export-cancel"))
    reg.add("export.progress", gr.HTML(progress_html(None, lang), elem_id="export-progress"), kind="none")
    reg.add("export.result", gr.Markdown("", elem_id="export-result"), kind="none")
    reg.add("export.file", gr.File(label=i18n.t("export.file", lang), visible=False, interactive=False))


def wire(reg: Registry, services: AppServices) -> None:
    lang = reg["top.lang"]
    inputs = [reg[f"export.{n}"] for n in ("source", "dtype", "shard_size", "target", "overwrite", "verify", "gguf",
                                            "zip")]
    outputs = [reg["export.progress"], reg["export.result"], reg["export.file"], reg["export.cancel"]]
    def start(*values):
        yield from run_export(services, *values)

    reg["export.start"].click(start, [*inputs, lang], outputs,
                              api_name="export_start", concurrency_limit=None, show_progress="hidden")
    reg["export.cancel"].click(lambda lg: cancel(services, lg), lang, reg["export.result"], api_name="export_cancel",
                               concurrency_limit=None, show_progress="hidden")
    def refresh(lg, source):
        choices = source_choices(services)
        # The newest run is what one usually exports next; a pick (or a typed folder) stays.
        shown = snapshot(services, lg)
        if not choices and not source and _JOBS.get(id(services)) is None:  # an empty list, explained
            shown[0] = _note_html(i18n.t("export.no_runs", i18n.normalize(lg)))
        return [gr.update(choices=choices, value=source or (choices[0][1] if choices else None)), *shown]

    refresh_out = [reg["export.source"], *outputs]
    reg["export.refresh"].click(refresh, [lang, reg["export.source"]], refresh_out, api_name="export_sources",
                                show_progress="hidden")
    reg["tab.export"].select(refresh, [lang, reg["export.source"]], refresh_out, api_name=False,
                             show_progress="hidden")


def source_choices(services: AppServices) -> list[tuple[str, str]]:
    """Fine-tuned runs (their ``lora/``) and their checkpoints, newest first."""
    return chat_tab.model_choices(services, kinds=("lora",))


def _source_name(source: str) -> str:
    path = Path(source)
    return path.parent.name if path.name == "lora" else path.name


def _stage_text(stage: str, lang: str) -> str:
    key = f"export.stage.{stage}"
    return i18n.t(key, lang) if key in i18n.strings(lang) else stage


def _note_html(text: str) -> str:
    return f'<div class="sage-progress empty">{_esc(text)}</div>'


def progress_html(job: ExportJob | None, lang: str) -> str:
    if job is None:
        return _note_html(i18n.t("export.idle", lang))
    if job.refused:
        return refused_html(job.source, lang)
    state = "failed" if job.error else "cancelled" if job.cancelled else "running" if job.running else "completed"
    pct = 100 * job.fraction
    stage = _stage_text(job.stage, lang)
    if state in ("failed", "cancelled"):
        stage = f"{'❌' if state == 'failed' else '⏹'} {i18n.t(f'export.state.{state}', lang, stage=stage)}"
    return (f'<div class="sage-progress status-{state}" data-state="{state}">'
            f'<div class="head"><b>{_esc(_source_name(job.source))}</b>'
            f' · {_esc(stage)} · {pct:.0f}% · {(job.ended or time.monotonic()) - job.started:.0f} s</div>'
            f'<div class="bar"><div class="fill" style="width:{pct:.1f}%"></div></div></div>')


def refused_html(source: str | None, lang: str) -> str:
    """The bar of an export a check refused: nothing ran, so no stage and no percentage."""
    name = f"<b>{_esc(_source_name(source))}</b> · " if source else ""
    return (f'<div class="sage-progress status-failed" data-state="refused">'
            f'<div class="head">{name}⛔ {_esc(i18n.t("export.state.refused", lang))}</div></div>')


def _check_inputs(guard: PathGuard, source: str | None, shard_size: str, target: str, gguf: str,
                  lang: str) -> tuple[Any, Path | None]:
    """Fast refusals before anything is loaded; returns (resolved source, output dir or None=default)."""
    from sage_ft.export import ExportError, parse_size, resolve_source
    from sage_ft.export.gguf_export import check_convertible

    if source in (None, ""):
        raise ExportError(i18n.t("export.pick_source", lang))
    name = (target or "").strip()
    if len(name) > TARGET_NAME_MAX:
        raise ExportError(i18n.t("export.long_target", lang, length=len(name), most=TARGET_NAME_MAX))
    if name and (not _TARGET_NAME.fullmatch(name) or ".." in name):
        raise ExportError(i18n.t("export.bad_target", lang, name=name))
    try:
        guard.check(str(source), i18n.t("export.source", lang))
    except PathRefused as exc:
        raise ExportError(str(exc)) from None
    resolved = resolve_source(str(source))
    parse_size(shard_size)
    if gguf and gguf != GGUF_NONE:
        check_convertible(resolved.base_model)  # an unsupported architecture is refused before the merge
    return resolved, (paths.exports_dir() / name if name else None)


def run_export(services: AppServices, source: str | None, dtype: str, shard_size: str, target: str, overwrite: bool,
               verify: bool, gguf: str, make_zip: bool, lang: str):
    """Start the export on a background thread and stream its progress; ends with the result."""
    from sage_ft.export import ExportError

    lang = i18n.normalize(lang)
    current = _JOBS.get(id(services))
    if current is not None and current.running:
        gr.Warning(i18n.t("export.busy", lang))
        yield gr.skip(), f"⚠️ {_esc(i18n.t('export.busy', lang))}", gr.skip(), cancel_button(current)
        return
    try:
        _, out_dir = _check_inputs(services.guard, source, shard_size, target, gguf, lang)
    except ExportError as exc:
        gr.Warning(str(exc))
        yield refused_html(source, lang), f"❌ {_esc(str(exc))}", gr.update(visible=False), cancel_button(current)
        return
    job = ExportJob(str(source))
    job.thread = threading.Thread(target=_work, args=(services, job, out_dir, dtype, shard_size, bool(overwrite),
                                                      bool(verify), gguf, bool(make_zip)),
                                  name="sage-ft-export", daemon=True)
    _JOBS[id(services)] = job
    job.thread.start()
    gr.Info(i18n.t("export.started", lang))
    # clears the previous export's result
    yield progress_html(job, lang), "", gr.update(visible=False), cancel_button(job)
    while job.running:
        job.thread.join(timeout=0.5)
        # the result area is left alone while it runs: it shows what Cancel answered until the end
        yield progress_html(job, lang), gr.skip(), gr.skip(), gr.skip()
    yield snapshot(services, lang)


def _work(services: AppServices, job: ExportJob, out_dir: Path | None, dtype: str, shard_size: str, overwrite: bool,
          verify: bool, gguf: str, make_zip: bool) -> None:
    """The whole export on the app's thread: merge, then GGUF, then zip, each honouring ``job.cancel``."""
    from sage_ft.export import ExportCancelled, ExportError, convert_to_gguf, merge_lora, zip_export

    with_gguf = bool(gguf) and gguf != GGUF_NONE
    merge_share = 0.6 if with_gguf else 0.9 if make_zip else 1.0

    def step(stage: str, fraction: float, start: float = 0.0, share: float = 1.0) -> None:
        job.stage, job.fraction = stage, start + share * fraction

    def timed(part: str, work):
        t0 = time.monotonic()
        try:
            return work()
        finally:
            job.part_seconds[part] = time.monotonic() - t0

    try:
        job.result = timed("merge", lambda: merge_lora(
            job.source, out_dir=out_dir, dtype=dtype, shard_size=shard_size, overwrite=overwrite,
            progress=lambda s, f: step(s, f, 0.0, merge_share), cancel_event=job.cancel, verify=verify,
            chat_manager=services.server))
        if job.result.verify is not None and not job.result.verify.ok:
            job.error = f"the merged model in {job.result.out_dir} does not match base + adapter; do not use it"
            return
        if with_gguf:
            job.gguf = timed("gguf", lambda: convert_to_gguf(
                job.result.out_dir, outtype=gguf, verify=verify, overwrite=overwrite, cancel_event=job.cancel,
                progress=lambda s, f: step(f"gguf: {s}", f, merge_share, 0.35)))
        if make_zip:
            job.zip_path = timed("zip", lambda: zip_export(
                job.result.out_dir, services.downloads_dir / f"{job.result.out_dir.name}.zip",
                cancel_event=job.cancel, progress=lambda s, f: step(s, f, 0.95, 0.05)))
        step("done", 1.0)
    except ExportCancelled as exc:
        job.cancelled, job.error, job.cancel_note = True, None, str(exc)
    except ExportError as exc:
        job.error, job.refused = str(exc), job.result is None and job.stage == "checking"
    except Exception as exc:  # torch/peft/transformers errors: reported, never a stack trace
        log.exception("export of %s failed", job.source)
        job.error = f"{type(exc).__name__}: {exc}"
    finally:
        job.ended = time.monotonic()


def snapshot(services: AppServices, lang: str) -> list[Any]:
    """Progress bar, result text, download and Cancel button of the app's latest export (for
    re-attaching a page)."""
    lang = i18n.normalize(lang)
    job = _JOBS.get(id(services))
    if job is None:
        return [progress_html(None, lang), "", gr.update(visible=False), cancel_button(None)]
    if job.running:
        return [progress_html(job, lang), "", gr.skip(), cancel_button(job)]
    return [progress_html(job, lang), result_markdown(job, lang),
            gr.update(value=str(job.zip_path), visible=True) if job.zip_path else gr.update(visible=False),
            cancel_button(job)]


def cancel_button(job: ExportJob | None) -> Any:
    """⏹ Cancel: on while the export runs, so the page does not offer a cancel with nothing to cancel."""
    return gr.update(interactive=job is not None and job.running)


def result_markdown(job: ExportJob, lang: str) -> str:
    if job.cancelled:
        return _cancelled_markdown(job, lang)
    lines = []
    if job.error:
        lines.append(f"❌ {_esc(i18n.t('export.failed', lang))}: {_esc(job.error)}")
    r = job.result
    if r is not None:
        lines.append(f"✅ {i18n.t('export.done', lang, seconds=f'{_total_seconds(job):.1f}')}"
                     f"{_parts_text(job, lang)}: `{r.out_dir}` — {r.dtype}, "
                     f"{len(r.weight_files)} × safetensors, {r.size_bytes / 1e6:.1f} MB")
        lines.append(_verify_line(i18n.t("export.verify_merge", lang), r.verify, lang))
    if job.gguf is not None:
        lines.append(f"✅ GGUF ({job.gguf.outtype}, {job.gguf.size_bytes / 1e6:.1f} MB): `{job.gguf.path}`")
        lines.append(_verify_line(i18n.t("export.verify_gguf", lang), job.gguf.verify, lang))
    if r is not None and not job.error:
        lines.append(i18n.t("export.listed", lang, name=r.out_dir.name))
    return "\n\n".join(lines)


def _total_seconds(job: ExportJob) -> float:
    return (job.ended or time.monotonic()) - job.started


def _parts_text(job: ExportJob, lang: str) -> str:
    """`` (merge 3.7 s · GGUF 18.2 s · zip 3.1 s)`` when the export had more than the merge."""
    if len(job.part_seconds) < 2:
        return ""
    return " (" + " · ".join(f"{i18n.t(f'export.part.{part}', lang)} {seconds:.1f} s"
                             for part, seconds in job.part_seconds.items()) + ")"


def _cancelled_markdown(job: ExportJob, lang: str) -> str:
    """⏹ and where it stopped; what was complete before the cancel and kept, said plainly."""
    stage = _stage_text(job.stage, lang)
    if job.result is None:
        return f"⏹ {_esc(i18n.t('export.cancelled', lang))} ({_esc(stage)})"
    lines = [f"⏹ {_esc(i18n.t('export.cancelled_after_merge', lang, stage=stage))}: {_esc(job.cancel_note)}",
             i18n.t("export.kept_merged" if job.result.verify is not None else "export.kept_merged_unverified",
                    lang, path=job.result.out_dir, name=job.result.out_dir.name)]
    if job.gguf is not None:
        lines.append(i18n.t("export.kept_gguf", lang, path=job.gguf.path))
    return "\n\n".join(lines)


def _verify_line(what: str, result: Any, lang: str) -> str:
    if result is None:
        return f"➖ {what}: {i18n.t('export.not_verified', lang)}"
    details = result.details or {}
    facts = (f"max |logit diff| {result.max_abs_diff:.3g}, tolerance {details.get('atol', float('nan')):.3g}, "
             f"top-1 {details.get('top1_agreement', 0.0):.0%}")
    return f"{'✅' if result.ok else '❌'} {what}: {i18n.t('export.passed' if result.ok else 'export.mismatch', lang)} ({facts})"


def cancel(services: AppServices, lang: str) -> str:
    lang = i18n.normalize(lang)
    job = _JOBS.get(id(services))
    if job is None or not job.running:
        return f"⚠️ {_esc(i18n.t('export.nothing_running', lang))}"
    job.cancel.set()
    gr.Info(i18n.t("export.cancel_requested", lang))
    return f"⏹ {_esc(i18n.t('export.cancel_requested', lang))}"


def _esc(text: object) -> str:
    """Escape text for Markdown/HTML text (quotes stay readable: no attribute contexts here)."""
    return html.escape(str(text), quote=False)
