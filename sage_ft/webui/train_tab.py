"""Train tab: model, dataset (upload / registered / built-in sample) with an immediate report,
presets and the hardware recommender, the generated config form, command + YAML preview,
save/load, and Start / Cancel / Resume.

Layout and wiring only: every value goes through ``TrainConfig``; data checks call
``sage_ft.data``; tasks are created and controlled through the app's one ``TaskManager``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import html
import logging
import time
from pathlib import Path
from typing import Any

import gradio as gr

from sage_ft import paths
from sage_ft.config import ConfigError, TrainConfig, closest_key
from sage_ft.data.load import SUFFIXES
from sage_ft.tasks import Task, TaskError, TaskStatus, parse_task_id, rundir
from sage_ft.webui import charts, form, form_memory, i18n, render
from sage_ft.webui.components import TOAST_S, Registry, forget_stamps, page_stamp
from sage_ft.webui.presets import PRESETS
from sage_ft.webui.services import AppServices, tokenizer_for
from sage_ft.webui.topbar import TickPart
from sage_ft.webui.uploads import PathRefused, UploadError, store_upload

log = logging.getLogger(__name__)

FIELDS = TrainConfig.field_names()
BASIC_ROW = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
             "gradient_accumulation_steps")
PREVIEW_ROWS = 3
TOKEN_STATS_ROWS = 2000  # token lengths are measured on at most this many rows (fast feedback)


def build(reg: Registry, services: AppServices, lang: str) -> None:
    choices = services.model_choices()
    model_override = {"widget": "dropdown", "choices": [(c.label, c.value) for c in choices],
                      "allow_custom_value": True, "value": "demo" if any(c.value == "demo" for c in choices)
                      else (choices[0].value if choices else "")}
    with gr.Row():
        with gr.Column(scale=3):
            form.build_fields(["model_name_or_path"], lang, reg, overrides={"model_name_or_path": model_override})
            reg.add("train.model_help", gr.Markdown(model_help(choices, lang)), kind="none")
            with gr.Row():
                reg.add("train.add_path", gr.Textbox(label=i18n.t("train.add_path", lang), scale=4,
                                                     placeholder="/path/to/model"))
                reg.add("train.add_model", gr.Button(i18n.t("train.add_model", lang), scale=1))
        with gr.Column(scale=2):
            reg.add("train.preset", gr.Radio(choices=list(PRESETS), label=i18n.t("train.preset", lang),
                                             value=None), key="train.preset")
            reg.add("train.recommend", gr.Button(i18n.t("train.recommend", lang), variant="secondary"))
            reg.add("train.fit", gr.Markdown("", elem_classes=[]), kind="none")
    with gr.Row():
        form.build_fields(BASIC_ROW, lang, reg)

    with gr.Group():
        reg.add("train.data_title", gr.Markdown(i18n.t("train.data_title", lang)))
        with gr.Row():
            reg.add("train.upload", gr.File(label=i18n.t("train.upload", lang), file_types=list(SUFFIXES),
                                            file_count="single", height=120, elem_id="dataset-upload"))
            with gr.Column():
                reg.add("train.registered", gr.Dropdown(choices=services.dataset_choices(), value=None,
                                                        label=i18n.t("train.registered", lang), allow_custom_value=False))
                with gr.Row():
                    reg.add("train.use_sample", gr.Button(i18n.t("train.use_sample", lang), size="sm"))
                    reg.add("train.refresh_datasets", gr.Button(i18n.t("train.refresh_datasets", lang), size="sm"))
        form.build_fields(["dataset"], lang, reg)
        with reg.add("train.data_options", gr.Accordion(i18n.t("train.data_options", lang), open=False)):
            with gr.Row():
                form.build_fields([n for n in form.names_in("data")], lang, reg)
            reg.add("train.eval_report", gr.Markdown("", elem_id="eval-report"), kind="none")
        reg.add("train.check_data", gr.Button(i18n.t("train.check_data", lang), size="sm"))
        reg.add("train.data_report", gr.Markdown("", elem_id="data-report"), kind="none")
        # shown while the report suggests a format and column mapping from the file's own keys
        reg.add("train.reading", gr.State(None), kind="none")
        reg.add("train.apply_reading", gr.Button(i18n.t("train.apply_reading", lang), variant="primary", size="sm",
                                                 visible=False, elem_id="apply-reading"))
        with gr.Row():
            reg.add("train.histogram", gr.Plot(label=i18n.t("train.histogram", lang), show_label=False))
            reg.add("train.preview", gr.HTML(render.chat_preview_html([], lang)), kind="none")

    with reg.add("train.lora_box", gr.Accordion(i18n.t("train.lora_box", lang), open=False)):
        quantization = [n for n in form.names_in("lora") if "quantization" in n]  # a row of their own (QLoRA)
        for names in ([n for n in form.names_in("lora") if n not in quantization], quantization):
            with gr.Row():
                form.build_fields(names, lang, reg)
    with reg.add("train.advanced_box", gr.Accordion(i18n.t("train.advanced_box", lang), open=False)):
        with gr.Row():
            form.build_fields(form.names_in("advanced") + form.names_in("output"), lang, reg)

    with reg.add("train.preview_box", gr.Accordion(i18n.t("train.preview_box", lang), open=True)):
        reg.add("train.command", gr.Code(label=i18n.t("train.command", lang), language="shell", interactive=False,
                                         lines=1, max_lines=4, elem_id="command-preview"))
        reg.add("train.yaml", gr.Code(label=i18n.t("train.yaml", lang), language="yaml", interactive=False,
                                      lines=8, max_lines=20))
    with gr.Row():
        reg.add("train.config_name", gr.Textbox(label=i18n.t("train.config_name", lang), scale=2,
                                                placeholder="my-run"))
        reg.add("train.save", gr.Button(i18n.t("train.save", lang), scale=1))
        reg.add("train.overwrite_config", gr.Checkbox(False, label=i18n.t("train.overwrite_config", lang),
                                                      scale=1, min_width=100))
        reg.add("train.config_list", gr.Dropdown(choices=services.config_choices(), value=None, scale=2,
                                                 label=i18n.t("train.config_list", lang)))
        reg.add("train.load", gr.Button(i18n.t("train.load", lang), scale=1))
        reg.add("train.config_upload", gr.UploadButton(i18n.t("train.config_upload", lang), file_types=[".yaml", ".yml"],
                                                       scale=1))
        reg.add("train.reset", gr.Button(i18n.t("train.reset", lang), scale=1, elem_id="train-reset"))
    reg.add("train.config_message", gr.Markdown(""), kind="none")
    reg.add("train.draft", gr.BrowserState(None, storage_key=form_memory.STORAGE_KEY,
                                           secret=form_memory.browser_secret()), kind="none")

    with gr.Row(equal_height=True):
        reg.add("train.start", gr.Button(i18n.t("train.start", lang), variant="primary", elem_id="start-btn", scale=2))
        # on only where the Task box's task allows them (action_buttons: as the box changes, and on the tick)
        reg.add("train.cancel", gr.Button(i18n.t("train.cancel", lang), variant="stop", scale=1, interactive=False,
                                          elem_id="train-cancel"))
        reg.add("train.resume", gr.Button(i18n.t("train.resume", lang), scale=1, interactive=False,
                                          elem_id="train-resume"))
        reg.add("train.stamp", page_stamp(), kind="none")
        # no rounding (precision=None): with precision=0 a typed 2.5 reached the handlers as task 2;
        # typed_task_id reads what is typed with the one task-id syntax and names anything else
        reg.add("train.task_id", gr.Number(label=i18n.t("train.task_id", lang), precision=None, value=None, scale=1,
                                           elem_id="train-task-id"))
    reg.add("train.message", gr.Markdown("", elem_id="train-message"), kind="none")
    reg.add("train.progress", gr.HTML(render.progress_html(None, lang), elem_id="train-progress"), kind="none")


# ====================================================================== wiring
def wire(reg: Registry, services: AppServices) -> TickPart:
    fields = [reg[f"train.{n}"] for n in FIELDS]
    lang = reg["top.lang"]
    data_inputs = [reg[f"train.{n}"] for n in ("dataset", "dataset_format", "column_mapping", "max_samples",
                                                "model_name_or_path", "template", "cutoff_len")]
    # the report, then (not API outputs) the suggested reading and the button that applies it
    data_outputs = [reg["train.data_report"], reg["train.histogram"], reg["train.preview"], reg["train.reading"],
                    reg["train.apply_reading"]]

    gr.on([f.change for f in fields], preview, inputs=[lang, *fields],
          outputs=[reg["train.command"], reg["train.yaml"]], api_name="preview", show_progress="hidden",
          trigger_mode="always_last", concurrency_limit=None)

    gr.on([f.change for f in fields], remember_form, inputs=fields, outputs=reg["train.draft"], api_name=False,
          show_progress="hidden", trigger_mode="always_last", concurrency_limit=None)
    reg["train.reset"].click(reset_form, lang, [*fields, reg["train.config_message"]], api_name="reset_form")

    reg["train.add_model"].click(lambda p, lg: add_model(services, p, lg), [reg["train.add_path"], lang],
                                 [reg["train.model_name_or_path"], reg["train.model_help"]], api_name="add_model")
    reg["train.preset"].input(lambda p, lg, *v: apply_preset(p, lg, *v), [reg["train.preset"], lang, *fields],
                              [*fields, reg["train.message"]], api_name="apply_preset")
    reg["train.recommend"].click(lambda lg, *v: recommend(lg, *v), [lang, *fields], [*fields, reg["train.fit"]],
                                 api_name="recommend")

    reg["train.upload"].upload(lambda f, lg: upload_dataset(services, f, lg), [reg["train.upload"], lang],
                               [reg["train.dataset"], reg["train.registered"], reg["train.message"]],
                               api_name="upload_dataset")
    reg["train.registered"].input(lambda p: p or gr.skip(), reg["train.registered"], reg["train.dataset"],
                                  api_name="pick_dataset")
    reg["train.use_sample"].click(lambda lg: use_sample(services, lg), lang,
                                  [reg["train.dataset"], reg["train.registered"], reg["train.message"]],
                                  api_name="use_sample")
    reg["train.refresh_datasets"].click(lambda: gr.update(choices=services.dataset_choices()), None,
                                        reg["train.registered"], api_name="refresh_datasets")
    check = lambda lg, *v: check_dataset(services, lg, *v)  # noqa: E731
    reg["train.dataset"].change(check, [lang, *data_inputs], data_outputs, api_name="check_dataset",
                                trigger_mode="always_last")
    reg["train.check_data"].click(check, [lang, *data_inputs], data_outputs, api_name=False)
    reg["train.apply_reading"].click(
        apply_reading, reg["train.reading"], [reg["train.dataset_format"], reg["train.column_mapping"]],
        api_name=False, show_progress="hidden",
    ).then(check, [lang, *data_inputs], data_outputs, api_name=False)
    # the report, its histogram and the preview are rendered in a language: again when it changes
    lang.change(check, [lang, *data_inputs], data_outputs, api_name=False, trigger_mode="always_last",
                show_progress="hidden")
    eval_inputs = [lang, *(reg[f"train.{n}"] for n in ("eval_dataset", "dataset_format", "column_mapping"))]
    check_eval = lambda *v: check_eval_dataset(services, *v)  # noqa: E731
    gr.on([reg["train.eval_dataset"].change, reg["train.check_data"].click, lang.change], check_eval, eval_inputs,
          reg["train.eval_report"], api_name="check_eval_dataset", trigger_mode="always_last", show_progress="hidden")

    # The overwrite tick comes last: API callers that leave it out save without overwriting.
    reg["train.save"].click(lambda name, lg, *v: save_config(services, name, lg, *v[:-1], overwrite=bool(v[-1])),
                            [reg["train.config_name"], lang, *fields, reg["train.overwrite_config"]],
                            [reg["train.config_message"], reg["train.config_list"]], api_name="save_config")
    reg["train.load"].click(lambda p, lg: load_config(services, p, lg), [reg["train.config_list"], lang],
                            [*fields, reg["train.config_message"]], api_name="load_config")
    reg["train.config_upload"].upload(lambda f, lg: upload_config(services, f, lg), [reg["train.config_upload"], lang],
                                      [*fields, reg["train.config_message"], reg["train.config_list"]],
                                      api_name="upload_config")

    progress_out = [reg["train.task_id"], reg["train.message"], reg["train.progress"]]
    started = reg["train.start"].click(lambda lg, *v: start(services, lg, *v), [lang, *fields], progress_out,
                                       api_name="start")
    started.success(lambda tid: parse_task_id(tid or "") or gr.skip(), reg["train.task_id"], reg["mon.task"],
                    api_name=False, show_progress="hidden")
    acted = [started]
    for action, handler in (("cancel", cancel), ("resume", resume)):
        acted.append(reg[f"train.{action}"].click(functools.partial(handler, services), [reg["train.task_id"], lang],
                                                  progress_out, api_name=action))
    for event in acted:
        forget_stamps(event, reg["train.stamp"])
    reg["top.api"].tick(lambda tid, lg: train_progress(services, tid, lg), [reg["train.task_id"], lang],
                        reg["train.progress"], api_name="train_progress", concurrency_limit=None,
                        show_progress="hidden")
    ticked = ("train.progress", "train.stamp", "train.cancel", "train.resume")
    # a task typed into the Task box, or put there by Start or a page's re-attach: its bar and buttons
    # at once, not at the next tick
    reg["train.task_id"].change(lambda tid, stamp, lg: progress_tick(services, tid, stamp, lg),
                                [reg["train.task_id"], reg["train.stamp"], lang], [reg[k] for k in ticked],
                                api_name=False, show_progress="hidden", trigger_mode="always_last")
    return TickPart(("train.task_id", "train.stamp", "top.lang"), ticked,
                    lambda tid, stamp, lg: progress_tick(services, tid, stamp, lg))


def on_load(services: AppServices, lang: str) -> tuple[Any, str]:
    """Re-attach to the newest running (else queued, else latest) task after a refresh or restart."""
    tasks = services.tasks.list()
    current = (next((t for t in tasks if t.status is TaskStatus.RUNNING), None)
               or next((t for t in tasks if t.status is TaskStatus.QUEUED), None)
               or (tasks[0] if tasks else None))
    if current is None:
        return None, render.progress_html(None, lang)
    return current.id, _progress(services, current, lang)


# ====================================================================== handlers
def _config(values: tuple[Any, ...]) -> TrainConfig:
    return _runs_relative(form.values_to_config(FIELDS, list(values)))


def _runs_relative(config: TrainConfig) -> TrainConfig:
    """A relative output_dir typed in the browser (or loaded from a LLaMA-Factory file: ``saves/…``)
    is a folder under the data home's runs/: the app's working folder (the source tree, when run.sh
    started it) means nothing to a browser user. The command preview shows where it resolves; the
    CLI keeps a shell's meaning (the current folder)."""
    out = config.output_dir.strip()
    if not out or Path(out).expanduser().is_absolute():
        return config
    return dataclasses.replace(config, output_dir=str(paths.runs_dir() / out))


def _problems_md(title: str, problems: list[str]) -> str:
    return f"**{html.escape(title)}**\n\n" + "\n".join(f"- {html.escape(p)}" for p in problems)


def preview(lang: str, *values: Any) -> tuple[str, str]:
    try:
        config = _config(values)
    except ConfigError as exc:
        text = i18n.t("train.invalid", lang) + "\n# " + "\n# ".join(exc.problems)
        return text, ""
    return config.to_command(), config.to_yaml()


def remember_form(*values: Any) -> Any:
    """Every valid change of the form goes to the browser's storage (``form_memory``)."""
    try:
        return form_memory.remember(_config(values))
    except ConfigError:
        return gr.skip()  # mid-edit: the last valid form stays stored


def restore_form(draft: Any) -> list[Any]:
    """On page load: the form as this browser left it (nothing changes without a stored draft)."""
    config = form_memory.recall(draft)
    if config is None:
        return [gr.skip()] * len(FIELDS)
    return form.config_to_values(config, FIELDS)


def reset_form(lang: str) -> list[Any]:
    """↺ Defaults: every setting back to its default (the stored draft follows through the change events)."""
    return [*form.config_to_values(TrainConfig(), FIELDS), i18n.t("train.reset_done", lang)]


def model_help(choices: list[Any], lang: str) -> str:
    if not choices:
        return i18n.t("train.no_models", lang)
    return ""


def add_model(services: AppServices, path: str, lang: str) -> tuple[Any, str]:
    if not (path or "").strip():
        gr.Warning(i18n.t("alert.empty_path", lang))
        return gr.skip(), i18n.t("alert.empty_path", lang)
    try:
        value = services.add_local_model(path.strip())
    except (ValueError, OSError) as exc:
        gr.Warning(str(exc))
        return gr.skip(), f"⚠️ {html.escape(str(exc))}"
    choices = [(c.label, c.value) for c in services.model_choices()]
    if value not in [v for _, v in choices]:
        choices.append((value, value))
    gr.Success(i18n.t("alert.model_added", lang, model=value))
    return gr.update(choices=choices, value=value), ""


def apply_preset(preset: str, lang: str, *values: Any) -> list[Any]:
    overlay = PRESETS.get(preset or "")
    if overlay is None:
        return [gr.skip()] * (len(FIELDS) + 1)
    try:
        config = _config(values)
        data = {**config.to_dict(), **overlay}
        config, _ = TrainConfig.from_dict(data)
    except ConfigError as exc:
        gr.Warning(i18n.t("alert.invalid_config", lang))
        return [gr.skip()] * len(FIELDS) + [_problems_md(i18n.t("alert.invalid_config", lang), exc.problems)]
    gr.Info(i18n.t("alert.preset_applied", lang, preset=preset))
    return [*form.config_to_values(config, FIELDS), i18n.t("alert.preset_applied", lang, preset=preset)]


def recommend(lang: str, *values: Any) -> list[Any]:
    """Fill batch/accumulation/cutoff/precision/checkpointing from the recommender; warn when it won't fit."""
    skip = [gr.skip()] * len(FIELDS)
    try:
        config = _config(values)
    except ConfigError as exc:
        return [*skip, _problems_md(i18n.t("alert.invalid_config", lang), exc.problems)]
    from sage_ft.estimate import EstimateError
    from sage_ft.estimate import recommend as core_recommend

    try:
        result = core_recommend(config)
    except (EstimateError, ValueError, OSError) as exc:  # the estimator names what it could not read
        gr.Warning(str(exc))
        return [*skip, f"⚠️ {html.escape(str(exc))}"]
    new_config, fits, message = _read_recommendation(config, result)
    if not fits:
        gr.Warning(i18n.t("alert.will_not_fit", lang))
        return [*form.config_to_values(new_config, FIELDS),
                f'<div class="fit-warning">⛔ <b>{html.escape(i18n.t("alert.will_not_fit", lang))}</b><br>'
                f"{html.escape(message)}</div>"]
    gr.Info(i18n.t("alert.recommended", lang))
    return [*form.config_to_values(new_config, FIELDS), f"✅ {html.escape(message)}"]


def _read_recommendation(config: TrainConfig, result: Any) -> tuple[TrainConfig, bool, str]:
    """Accept the recommender's result as an object or dict: a config or changes, fits, a message."""
    get = result.get if isinstance(result, dict) else (lambda k, d=None: getattr(result, k, d))
    new = get("config")
    if not isinstance(new, TrainConfig):
        changes = get("changes") or get("settings") or {}
        new = TrainConfig.from_dict({**config.to_dict(), **dict(changes)})[0] if changes else config
    fits = get("fits")
    fits = True if fits is None else bool(fits)
    message = get("message") or get("reasons") or ""
    if not isinstance(message, str):
        message = "; ".join(map(str, message))
    estimate = get("estimate")
    if estimate is not None and hasattr(estimate, "describe"):
        message += f" — {estimate.describe().splitlines()[0]}"
    return new, fits, message


def upload_dataset(services: AppServices, file: Any, lang: str) -> tuple[Any, Any, str]:
    if not file:
        return gr.skip(), gr.skip(), ""
    try:
        stored = store_upload(file if isinstance(file, str) else file.name, "dataset", services.max_upload_bytes)
    except UploadError as exc:
        gr.Warning(str(exc))
        return gr.skip(), gr.skip(), f"⚠️ {html.escape(str(exc))}"
    gr.Info(i18n.t("alert.uploaded", lang, name=stored.name))
    return str(stored), gr.update(choices=services.dataset_choices(), value=str(stored)), ""


def use_sample(services: AppServices, lang: str) -> tuple[Any, Any, str]:
    from sage_ft.data import DataError, builtin_sample_dataset

    try:
        path = builtin_sample_dataset()
    except DataError as exc:
        gr.Warning(str(exc))
        return gr.skip(), gr.skip(), f"⚠️ {html.escape(str(exc))}"
    return str(path), gr.update(choices=services.dataset_choices(), value=str(path)), ""


def check_dataset(services: AppServices, lang: str, dataset: str, fmt: str, column_mapping: str,
                  max_samples: Any, model: str, template: str, cutoff_len: Any) -> tuple[Any, ...]:
    """Validation report, token-length histogram and chat preview of the chosen dataset files, then
    the reading their keys suggest (``[format, column mapping]`` or None) and its button."""
    report_text, figure, preview, reading = _check_dataset(services, lang, dataset, fmt, column_mapping, max_samples,
                                                           model, template, cutoff_len)
    suggested = [reading.fmt, reading.column_mapping] if reading else None
    return report_text, figure, preview, suggested, gr.update(visible=suggested is not None)


def apply_reading(reading: list[str] | None) -> tuple[Any, Any]:
    """Dataset format and column mapping set to the suggested reading (its button is hidden without one)."""
    if not reading:
        return gr.skip(), gr.skip()
    return reading[0], reading[1]


def _check_dataset(services: AppServices, lang: str, dataset: str, fmt: str, column_mapping: str,
                   max_samples: Any, model: str, template: str, cutoff_len: Any) -> tuple[str, Any, str, Any]:
    from sage_ft.data import DataError, load_dataset

    dataset = (dataset or "").strip()
    if not dataset:
        return i18n.t("alert.no_dataset", lang), None, render.chat_preview_html([], lang), None
    try:
        for part in dataset.split(","):
            services.guard.check(part, "dataset")
        max_n = int(max_samples) if max_samples not in (None, "") else None
        report = load_dataset(dataset, fmt or "auto", column_mapping or "", max_n, raise_on_error=False)
    except (PathRefused, DataError, ValueError) as exc:
        gr.Warning(str(exc).splitlines()[0])
        return f"❌ {html.escape(str(exc))}", None, render.chat_preview_html([], lang), None
    figure = None
    token_line = ""
    if report.conversations:
        try:
            from sage_ft.data.load import token_stats_of
            from sage_ft.data.tokenize import token_length_stats, tokenize_conversations

            cutoff = int(cutoff_len or 1024)
            tokenizer = tokenizer_for(model or "demo", template or "auto")
            sample = report.conversations[:TOKEN_STATS_ROWS]
            encoded = tokenize_conversations(sample, tokenizer, 1_048_576, template or "auto")
            lengths = [len(s["input_ids"]) for s in encoded]
            stats = token_length_stats(list(encoded), cutoff)
            figure = charts.token_histogram(lengths, cutoff, title=i18n.t("train.histogram", lang))
            token_line = i18n.t("data.token_stats", lang, count=stats["count"], mean=stats["mean"], p95=stats["p95"],
                                max=stats["max"], over=sum(1 for n in lengths if n > cutoff), cutoff=cutoff)
            # answers cut off at cutoff_len: NOT OK when all are (Start refuses it), a warning when some are
            report.token_stats = token_stats_of(list(encoded), cutoff, len(report.conversations))
            cut_off = report.token_stats.problem() or report.token_stats.warning()
            token_line += f"\n\n{'❌' if report.token_stats.problem() else '⚠️'} {html.escape(cut_off)}" if cut_off else ""
        except Exception as exc:  # token stats are extra information; the report stands without them
            log.info("token stats unavailable: %s", exc)
            token_line = i18n.t("data.no_token_stats", lang, reason=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    text = _report_markdown(report, lang, "data", token_line)
    return text, figure, render.chat_preview_html(report.preview(PREVIEW_ROWS), lang), report.suggested_reading


def _report_markdown(report: Any, lang: str, key: str, extra: str = "") -> str:
    """The verdict (``{key}.ok`` / ``{key}.not_ok``) with the row counts, ``extra`` lines, then the full
    report, open where the data cannot be used (the verdict sends the reader to "the problems below")."""
    head = f"✅ {i18n.t(f'{key}.ok', lang)}" if report.ok else f"❌ {i18n.t(f'{key}.not_ok', lang)}"
    rows = i18n.t("data.rows", lang, ok=report.rows_ok, total=report.rows_total, dropped=len(report.dropped))
    text = f"**{head}** — {rows}" + (f"\n\n{extra}" if extra else "")
    state = "" if report.ok else " open"
    return (text + f"\n\n<details{state}><summary>{i18n.t('data.details', lang)}</summary>"
                   f"<pre>{html.escape(report.summary())}</pre></details>")


def check_eval_dataset(services: AppServices, lang: str, eval_dataset: str, fmt: str, column_mapping: str) -> str:
    """One line on ``eval_dataset`` (read as the run will: a folder means its test/validation split),
    with the full report under it where it cannot be used; empty without eval data."""
    from sage_ft.data import DataError, load_dataset

    eval_dataset = (eval_dataset or "").strip()
    if not eval_dataset:
        return ""
    try:
        for part in eval_dataset.split(","):
            services.guard.check(part, "eval_dataset")
        report = load_dataset(eval_dataset, fmt or "auto", column_mapping or "", split="eval", raise_on_error=False)
    except (PathRefused, DataError, ValueError) as exc:
        return f"❌ eval_dataset: {html.escape(str(exc))}"
    return _report_markdown(report, lang, "data.eval")


def save_config(services: AppServices, name: str, lang: str, *values: Any, overwrite: bool = False) -> tuple[str, Any]:
    """Save the form under ``name``; an existing config of that name is replaced only with the
    Overwrite tick (it was replaced without a word)."""
    try:
        config = _config(values)
        path = services.config_path_for(name or "")
    except ConfigError as exc:
        gr.Warning(i18n.t("alert.invalid_config", lang))
        return _problems_md(i18n.t("alert.invalid_config", lang), exc.problems), gr.skip()
    except ValueError as exc:
        gr.Warning(str(exc))
        return f"⚠️ {html.escape(str(exc))}", gr.skip()
    replacing = path.exists()
    if replacing and not overwrite:
        text = i18n.t("alert.config_exists", lang, name=path.name)
        gr.Warning(text)
        return f"⚠️ {html.escape(text)}", gr.skip()
    path.parent.mkdir(parents=True, exist_ok=True)
    config.save_yaml(path)
    key = "alert.config_replaced" if replacing else "alert.saved"
    gr.Success(i18n.t(key, lang, path=path.name))
    return html.escape(i18n.t(key, lang, path=str(path))), gr.update(choices=services.config_choices(), value=str(path))


def load_config(services: AppServices, path: str, lang: str) -> list[Any]:
    return _load_config(services, path, lang)[0]


def _load_config(services: AppServices, path: str, lang: str) -> tuple[list[Any], bool]:
    """The form values and message for a config file, and whether it loaded."""
    skip = [gr.skip()] * len(FIELDS)
    if not path:
        return [*skip, i18n.t("alert.pick_config", lang)], False
    try:
        services.guard.check(path, "config file")
        config, unknown = TrainConfig.from_yaml(path)
    except PathRefused as exc:
        gr.Warning(str(exc))
        return [*skip, f"⚠️ {html.escape(str(exc))}"], False
    except ConfigError as exc:
        gr.Warning(i18n.t("alert.invalid_config", lang))
        return [*skip, _problems_md(i18n.t("alert.invalid_config", lang), exc.problems)], False
    message = i18n.t("alert.loaded", lang, path=Path(path).name)
    if unknown:
        named = [i18n.t("alert.did_you_mean", lang, name=k, guess=g) if (g := closest_key(k)) else k for k in unknown]
        note = i18n.t("alert.unknown_keys", lang, keys=", ".join(named))
        gr.Warning(note)
        message += f"\n\n⚠️ {html.escape(note)}"
    else:
        gr.Success(i18n.t("alert.loaded", lang, path=Path(path).name))
    return [*form.config_to_values(config, FIELDS), message], True


def upload_config(services: AppServices, file: Any, lang: str) -> list[Any]:
    """Load an uploaded YAML into the form. It is kept (and listed, tagged 'uploaded') only when it
    loads, and once: a file that fails to load is removed, and the same file uploaded again is the
    earlier upload."""
    if not file:
        return [gr.skip()] * (len(FIELDS) + 2)
    try:
        stored = store_upload(file if isinstance(file, str) else file.name, "config", services.max_upload_bytes)
    except UploadError as exc:
        gr.Warning(str(exc))
        return [gr.skip()] * len(FIELDS) + [f"⚠️ {html.escape(str(exc))}", gr.skip()]
    earlier = services.earlier_upload(stored)
    if earlier is not None:
        services.discard_upload(stored)
        stored = earlier
    out, loaded = _load_config(services, str(stored), lang)
    if not loaded:
        services.discard_upload(stored)
        return [*out, gr.update(choices=services.config_choices())]
    return [*out, gr.update(choices=services.config_choices(), value=str(stored))]


def start(services: AppServices, lang: str, *values: Any) -> tuple[Any, str, str]:
    try:
        config = _config(values)
    except ConfigError as exc:
        gr.Warning(i18n.t("alert.invalid_config", lang))
        return gr.skip(), _problems_md(i18n.t("alert.invalid_config", lang), exc.problems), gr.skip()
    if not config.datasets:
        gr.Warning(i18n.t("alert.no_dataset", lang))
        return gr.skip(), f"⚠️ {i18n.t('alert.no_dataset', lang)}", gr.skip()
    problems = services.guard.check_config(config)
    if problems:
        gr.Warning(problems[0])
        return gr.skip(), _problems_md(i18n.t("alert.not_started", lang), problems), gr.skip()
    twin = _just_queued(services, config)
    if twin is not None:
        text = i18n.t("alert.just_queued", lang, id=twin.id, seconds=DOUBLE_START_S)
        gr.Warning(text)
        return twin.id, f"⚠️ {html.escape(text)}", render.progress_html(twin, lang)
    try:
        services.tasks.validate(config)  # what cannot run at all is said before what does not fit
        blocked = fit_warning(config, lang)
        if blocked:
            gr.Warning(i18n.t("alert.will_not_fit", lang), duration=TOAST_S)
            return gr.skip(), blocked, gr.skip()
        task = services.tasks.create(config, source="ui")
        services.form_starts[config.to_yaml()] = (task.id, time.monotonic())
    except TaskError as exc:
        found = getattr(exc, "problems", [str(exc)])
        gr.Warning(i18n.t("alert.not_started", lang))
        return gr.skip(), _problems_md(i18n.t("alert.not_started", lang), found), gr.skip()
    gr.Success(i18n.t("alert.queued", lang, id=task.id, name=task.name))
    return task.id, "✅ " + html.escape(i18n.t("alert.queued", lang, id=task.id, name=task.name)), \
        render.progress_html(task, lang)


# A second ▶ Start within this many seconds with the same settings is a double click, not a wish for two
# identical runs (two were queued a second apart): it is answered with the first one.
DOUBLE_START_S = 5


def _just_queued(services: AppServices, config: TrainConfig) -> Any:
    """The task the same settings queued less than ``DOUBLE_START_S`` ago, while it is still queued or running."""
    task_id, when = services.form_starts.get(config.to_yaml(), (None, 0.0))
    if task_id is None or time.monotonic() - when > DOUBLE_START_S:
        return None
    try:
        task = services.tasks.task(task_id)
    except TaskError:  # deleted meanwhile
        return None
    return task if task.status in (TaskStatus.QUEUED, TaskStatus.RUNNING) else None


def fit_warning(config: TrainConfig, lang: str) -> str:
    """The blocking warning when the memory estimate says the run won't fit ('' when it fits or
    when the estimate cannot be made, e.g. a hub model that is not downloaded yet)."""
    from sage_ft.estimate import EstimateError, check_fit

    try:
        report = check_fit(config)
    except (EstimateError, ValueError, OSError) as exc:
        log.info("no memory estimate for %s: %s", config.model_name_or_path, exc)
        return ""
    if report.fits:
        return ""
    changes = ", ".join(f"{k}={v}" for k, v in report.suggestion.items())
    return (f'<div class="fit-warning">⛔ <b>{html.escape(i18n.t("alert.will_not_fit", lang))}</b><br>'
            f"{html.escape(report.warning)}<br>{html.escape(i18n.t('alert.fit_hint', lang, changes=changes))}</div>")


def typed_task_id(value: Any, lang: str) -> int | None:
    """The task the Task box names: a whole number (or, from an API caller, ``"7"``/``"#7"``: the one
    task-id syntax, ``parse_task_id``); None when empty. Anything else (``2.5``, ``abc``) raises
    ``TaskError`` saying it is not a task id, instead of acting on another task."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    task_id = parse_task_id(text)
    if task_id is None:
        raise TaskError(i18n.t("alert.bad_task_id", lang, text=text[:40]))
    return task_id


def _task_action(services: AppServices, task_id: Any, lang: str, action: str) -> tuple[Any, str, str]:
    try:
        picked = typed_task_id(task_id, lang)
        if picked is None:
            gr.Warning(i18n.t("alert.no_task", lang))
            return gr.skip(), f"⚠️ {i18n.t('alert.no_task', lang)}", gr.skip()
        task = getattr(services.tasks, action)(picked)
    except TaskError as exc:
        text = render.task_error_text(exc, lang)
        gr.Warning(text)
        return gr.skip(), f"⚠️ {html.escape(text)}", gr.skip()
    text = render.cancel_message(task, lang) if action == "cancel" else i18n.t("alert.resumed", lang, id=task.id)
    gr.Info(text)
    return task.id, html.escape(text), _progress(services, task, lang)


def cancel(services: AppServices, task_id: Any, lang: str) -> tuple[Any, str, str]:
    return _task_action(services, task_id, lang, "cancel")


def resume(services: AppServices, task_id: Any, lang: str) -> tuple[Any, str, str]:
    return _task_action(services, task_id, lang, "resume")


def progress_tick(services: AppServices, task_id: Any, stamp: str | None, lang: str) -> tuple[Any, ...]:
    """The progress bar, its fingerprint (task row version + queue + language) and the Cancel and
    Resume buttons (``action_buttons``), or skips when the fingerprint is unchanged."""
    try:
        picked = typed_task_id(task_id, lang)
        if picked is None:  # an emptied box: the bar stays as it was, the buttons go off
            return (gr.skip(),) * 4 if stamp == NO_TASK else (gr.skip(), NO_TASK, *action_buttons(None))
        task = services.tasks.task(picked)
    except TaskError as exc:  # not a task id, or no such task: the box says which
        note = render.progress_note(render.task_error_text(exc, lang))
        return (gr.skip(),) * 4 if note == stamp else (note, note, *action_buttons(None))
    queue = services.queue_stamp(task)  # moves with the tasks ahead (a pause among them) and the clock
    new_stamp = f"{task_id}@{task.updated_at}:{queue}:{lang}"
    if new_stamp == stamp:
        return (gr.skip(),) * 4
    return _progress(services, task, lang), new_stamp, *action_buttons(task)


NO_TASK = "no task"  # the fingerprint of an empty Task box


def action_buttons(task: Task | None) -> list[Any]:
    """Cancel and Resume, on only where the task's state allows them (``render.allowed_actions``: the
    Monitor's rule), so the page shows what can be done instead of refusing it after a click."""
    # the run folder is read only for a task whose state allows a resume
    has_checkpoint = task is not None and task.status.is_resumable and bool(rundir.checkpoints(task.output_dir))
    allowed = render.allowed_actions(task, has_checkpoint)
    return [gr.update(interactive=allowed["cancel"]), gr.update(interactive=allowed["resume"])]


def train_progress(services: AppServices, task_id: Any, lang: str) -> Any:
    try:
        picked = typed_task_id(task_id, lang)
        if picked is None:
            return gr.skip()
        return _progress(services, services.tasks.task(picked), lang)
    except TaskError as exc:
        return render.progress_note(render.task_error_text(exc, lang))


def _progress(services: AppServices, task: Any, lang: str) -> str:
    """The bar of one task: a queued one with its place, expected start, and the paused task it waits for."""
    if task.status is TaskStatus.QUEUED:
        with contextlib.suppress(TaskError):  # its place in the queue and expected start
            task = services.tasks.get(task.id)
    return render.progress_html(task, lang, paused_ahead=render.paused_ahead(services.tasks, task))

