"""The Train UI: a sub-tab of the host's Train tab and the extension's own "Anima" tab (train + contexts list).

Both run :func:`lib_anima.webui.training.run` through the host's ``wrap_gradio_gpu_call`` (queue lock, progress
bar, Interrupt), exactly what the HTTP API runs. "Send to Anima" buttons sit beside the txt2img/img2img gallery
buttons and under the PNG Info image; they fill the Anima tab's reference image and, from the image's infotext,
its training prompt.
"""

from __future__ import annotations

import html
import os
import random

import gradio as gr
from modules import call_queue, shared
from modules.ui_components import FormRow, ToolButton

from lib_anima.errors import AnimaError
from lib_anima.layout import PRESETS
from lib_anima.names import check_name
from lib_anima.options import default_of
from lib_anima.webui import store, sweep, training
from lib_anima.webui.train_inputs import TrainRequest, prompt_from_infotext, request_from, templates
from lib_anima.webui.train_progress import Progress

SOURCES = {  # host component after which a "send to Anima" button is created → the image it sends
    "txt2img_send_to_extras": "txt2img_gallery",
    "img2img_send_to_extras": "img2img_gallery",
    "pnginfo_image": "pnginfo_image",
}
_host_components: dict[str, gr.components.Component] = {}
_send_buttons: dict[str, gr.Button] = {}


def on_after_component(component, **kwargs) -> None:
    """Remember the host's galleries and put a send button beside the gallery buttons / under PNG Info's image."""
    elem_id = kwargs.get("elem_id") or getattr(component, "elem_id", None)
    if not elem_id:
        return
    if elem_id in SOURCES.values():
        _host_components[elem_id] = component
    if elem_id in SOURCES:
        source = SOURCES[elem_id]
        if elem_id == "pnginfo_image":
            _send_buttons[source] = gr.Button("Send to Anima", elem_id="anima_send_from_pnginfo", size="sm")
        else:
            tab = source.split("_")[0]
            _send_buttons[source] = ToolButton("🅰️", elem_id=f"anima_send_from_{tab}",
                                               tooltip="Send this image to the Anima tab to train a context from it.")


GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4

if not GRADIO_4:  # Gradio 4 has no sketch tool (and writes a .pyi stub next to any subclass of its components)

    class ReferenceImage(gr.Image):
        """The reference image with the sketch tool (draw on it to mark what to learn), taking an image with no mask.

        Gradio's sketch preprocessing decodes the mask unconditionally, but the browser sends none until something
        is drawn, so an upload (file chooser, drag and drop, paste) failed with ``'NoneType' object has no attribute
        'rsplit'``. Here "nothing drawn" is simply no mask.
        """

        def get_block_name(self) -> str:  # the browser renders it as Gradio's own image component
            return "image"

        def preprocess(self, x):
            if isinstance(x, dict) and not x.get("mask"):
                return None if not x.get("image") else {"image": self._image(x["image"]), "mask": None}
            return super().preprocess(x)

        def _image(self, data: str):
            from gradio import processing_utils

            image = processing_utils.decode_base64_to_image(data)  # PNG text (the infotext) is kept in .info
            return self._format_image(image.convert(self.image_mode))


def _templates() -> list[str]:
    return sorted(templates())


def _image_and_mask(value) -> tuple:
    """The sketch image's value → (image, drawn mask or None). Nothing drawn means no mask."""
    if value is None:
        return None, None
    if isinstance(value, dict):
        image, mask = value.get("image"), value.get("mask")
        if mask is not None and mask.convert("L").getextrema()[1] == 0:
            mask = None
        return image, mask
    return value, None


# The Train button's inputs after id_task, in order. Every one but the image and the mask is the TrainOptions
# field of the same name (lib_anima.options): the form is read by name, its defaults come from there and the model
# checks its values.
FORM_FIELDS = ("name", "image", "mask", "prompt", "dataset_dir", "template", "name_text", "use_alpha", "init_text",
               "n_tokens", "weights", "steps", "learning_rate", "batch_size", "grad_accumulation", "resolution", "flip",
               "seed", "save_every", "preview_every", "preview_prompt", "sweep", "resume", "overwrite")


def _train(id_task, *values):
    """The Train button (runs under wrap_gradio_gpu_call: queue lock, shared.state begun)."""
    try:
        request = _request(dict(zip(FORM_FIELDS, values, strict=True)))
        progress = Progress()
        with training.exclusive():
            progress.started = True
            summary = training.run(request, progress)
    except AnimaError as e:
        return None, None, f"<p class='anima-error'>Training failed: {html.escape(str(e))}</p>"
    state = "interrupted (state saved: tick Resume to continue)" if summary["interrupted"] else "finished"
    text = (f"<p>Training {state} at step {summary['steps']}: context <b>{html.escape(summary['name'])}</b> "
            f"saved (hash {summary['hash']}, last loss {summary['final_loss']}).<br>"
            f"Log, previews and checkpoints: {html.escape(summary['log_directory'])}</p>")
    if summary.get("sweep"):
        text += f"<p>{_sweep_caption(summary['sweep'])}</p>"
    return progress.preview, progress.sweep, text


def _request(form: dict) -> TrainRequest:
    """The form's values by name → the request (checked by the options model; a refusal names the field)."""
    image, drawn = _image_and_mask(form.pop("image"))
    uploaded = form.pop("mask")
    mask = uploaded if uploaded is not None else drawn
    options = {name: _form_value(value) for name, value in form.items()}
    options["name"] = options["name"].strip()
    options["weights"] = "" if options["weights"] == "all" else options["weights"]
    images = [image] if image is not None and not options["dataset_dir"].strip() else []
    return request_from(options, images, [mask] if mask is not None and images else [])


def _form_value(value):
    """A Gradio value as the option wants it: an empty text box is "", a whole number from a Number input an int."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _sweep_caption(record: dict) -> str:
    if "error" in record:
        return f"The scale sweep failed: {html.escape(record['error'])}"
    return (f"Scale sweep ({', '.join(record['labels'])}; seed {record['seed']}, {record['steps']} steps, "
            f"{record['seconds']} s): {html.escape(record['path'] or 'not saved')}")


def _prompt_of(image_value) -> str:
    image, _ = _image_and_mask(image_value)
    return prompt_from_infotext(image) if image is not None else gr.update()


def _received(filedata):
    """A gallery item or PNG Info image → (reference image, its infotext prompt)."""
    from modules import infotext_utils

    image = filedata if hasattr(filedata, "size") else infotext_utils.image_from_url_text(filedata)
    if image is None:
        return gr.update(), gr.update()
    return image, prompt_from_infotext(image) or gr.update()




def _reference_inputs(prefix: str) -> tuple:
    """The reference image and the mask upload. Gradio 3 (A1111, reForge) lets one draw the mask on the reference
    (its sketch tool); Gradio 4 (Forge) has no such tool on an image input, so there the mask is uploaded."""
    if GRADIO_4:
        image = gr.Image(label="Reference", type="pil", image_mode="RGBA", sources=["upload", "clipboard"],
                         elem_id=f"{prefix}_image")
        mask = gr.Image(label="Mask (optional; white = learn, black = ignore)", type="pil", image_mode="L",
                        sources=["upload", "clipboard"], elem_id=f"{prefix}_mask")
        return image, mask
    image = ReferenceImage(label="Reference (draw on it to mark what to learn; optional)", type="pil",
                           image_mode="RGBA", source="upload", tool="sketch", elem_id=f"{prefix}_image")
    mask = gr.Image(label="Mask upload (optional; white = learn)", type="pil", image_mode="L",
                    source="upload", elem_id=f"{prefix}_mask")
    return image, mask


def _number(name: str, label: str, prefix: str) -> gr.Number:
    """A whole-number option's input with the model's default. Its bounds are checked by the model, whose refusal
    names the field (Gradio's own minimum/maximum would refuse before the run with a message that does not)."""
    return gr.Number(label=label, value=default_of(name), precision=0, elem_id=f"{prefix}_{name}")


def _checkbox(name: str, label: str, prefix: str) -> gr.Checkbox:
    return gr.Checkbox(label=label, value=default_of(name), elem_id=f"{prefix}_{name}")


def _build_options(c: dict, prefix: str) -> None:
    """The training options under the inputs (tokens, sites, steps, rate, batch, saving, previews, sweep)."""
    with FormRow():
        c["use_alpha"] = _checkbox("use_alpha", "Use PNG alpha channel as loss weight", prefix)
        c["flip"] = _checkbox("flip", "Train on horizontal flips too", prefix)
    with FormRow():
        c["init_text"] = gr.Textbox(label="Initialization text (empty: small random)", elem_id=f"{prefix}_init_text")
        c["n_tokens"] = _number("n_tokens", "Tokens per site", prefix)
        c["weights"] = gr.Dropdown(label="Sites", choices=["all", *[p for p in PRESETS if p != "all"]],
                                   value="all", elem_id=f"{prefix}_weights")
    with FormRow():
        c["steps"] = _number("steps", "Steps", prefix)
        # (a new label: the host's ui-config.json keeps a component's old default under its old label)
        c["learning_rate"] = gr.Textbox(label="Learning rate (a number or schedule syntax)",
                                        value=default_of("learning_rate"),
                                        elem_id=f"{prefix}_learning_rate")
        c["seed"] = _number("seed", "Seed (-1: random)", prefix)
    with FormRow():
        c["batch_size"] = _number("batch_size", "Batch size", prefix)
        c["grad_accumulation"] = _number("grad_accumulation", "Gradient accumulation", prefix)
        c["resolution"] = _number("resolution", "Resolution (0: model's native)", prefix)
    with FormRow():
        c["save_every"] = _number("save_every", "Save state every N steps (0: end only)", prefix)
        c["preview_every"] = _number("preview_every", "Preview every N steps (0: none)", prefix)
    c["preview_prompt"] = gr.Textbox(label="Preview prompt (empty: the training prompt)", elem_id=f"{prefix}_preview_prompt")
    c["sweep"] = _checkbox("sweep", "Scale sweep after training (scales 0, 0.5, 1, 1.5 and 1 negative, one seed)", prefix)


def build_train(prefix: str) -> dict:
    """The training form; `prefix` keeps element ids unique between the two places it is shown."""
    c: dict = {}
    with gr.Row(equal_height=False):
        with gr.Column(variant="panel"):
            with FormRow():
                c["name"] = gr.Textbox(label="Context name", elem_id=f"{prefix}_name")
                c["overwrite"] = _checkbox("overwrite", "Overwrite an existing context", prefix)
                c["resume"] = _checkbox("resume", "Resume the saved run of this name", prefix)
            with gr.Tabs():
                with gr.Tab("Reference image"):
                    c["image"], c["mask"] = _reference_inputs(prefix)
                    c["prompt"] = gr.Textbox(label="Training prompt (filled from the image's infotext)", lines=2,
                                             elem_id=f"{prefix}_prompt")
                with gr.Tab("Dataset"):
                    c["dataset_dir"] = gr.Textbox(label="Dataset directory (textual-inversion layout)",
                                                  elem_id=f"{prefix}_dataset_dir")
                    with FormRow():
                        c["template"] = gr.Dropdown(label="Prompt template", choices=_templates(),
                                                    value="subject_filewords.txt", elem_id=f"{prefix}_template")
                        c["name_text"] = gr.Textbox(label="[name] becomes", elem_id=f"{prefix}_name_text")
            _build_options(c, prefix)
            with gr.Row():
                c["train"] = gr.Button("Train context", variant="primary", elem_id=f"{prefix}_train")
                c["interrupt"] = gr.Button("Interrupt", elem_id=f"{prefix}_interrupt")
        with gr.Column(elem_id=f"{prefix}_gallery_container"):
            c["output"] = gr.HTML(elem_id=f"{prefix}_output")
            gr.HTML(elem_id=f"{prefix}_progress")  # live step/loss/ETA text, written by the page's script
            c["preview"] = gr.Image(label="Last preview", interactive=False, elem_id=f"{prefix}_preview")
            c["sweep_image"] = gr.Image(label="Scale sweep", interactive=False, elem_id=f"{prefix}_sweep_image")
            c["id_task"] = gr.Textbox(visible=False, elem_id=f"{prefix}_id_task")
    inputs = [c["id_task"], *(c[name] for name in FORM_FIELDS)]
    c["done"] = c["train"].click(fn=call_queue.wrap_gradio_gpu_call(_train, extra_outputs=[None, None]),
                     _js=f"(...args) => animaStartJob('{prefix}', args)",
                     inputs=inputs, outputs=[c["preview"], c["sweep_image"], c["output"]])  # the host's error text goes last
    c["interrupt"].click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])
    c["image"].upload(fn=_prompt_of, inputs=[c["image"]], outputs=[c["prompt"]])
    return c


def _contexts_table() -> str:
    library = store.library()
    rows = []
    for name in library.names():
        try:
            info = library.info(name)
        except AnimaError as e:
            rows.append(f"<tr><td>{html.escape(name)}</td><td colspan=5>{html.escape(str(e))}</td></tr>")
            continue
        record = info.training or {}
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            name, info.arch, info.n_sites, info.n_tokens, record.get("steps", ""), info.shorthash)) + "</tr>")
    errors = "".join(f"<li>{html.escape(n)}: {html.escape(e)}</li>" for n, e in library.errors().items())
    head = "<tr><th>name</th><th>model</th><th>sites</th><th>tokens</th><th>steps</th><th>hash</th></tr>"
    folder = html.escape(library.directory)
    return (f"<p>Folder: {folder}</p><table class='anima-table'>{head}{''.join(rows)}</table>"
            + (f"<p>Unreadable files:</p><ul>{errors}</ul>" if errors else ""))


def _listed() -> tuple[str, dict]:
    """The folder reread: the table, and every file's name (broken ones too) for the delete/rename choice."""
    library = store.library()
    library.refresh()
    names = sorted({*library.names(), *library.errors()}, key=str.lower)
    return _contexts_table(), gr.update(choices=names, value=names[0] if names else None)


def _listed_everywhere() -> tuple[str, dict, dict]:
    """The Contexts table and choice, and the Compare choice (valid contexts only)."""
    table, chosen = _listed()
    return table, chosen, gr.update(choices=store.library().names())


def _done(message: str) -> tuple[str, dict, str]:
    return (*_listed(), f"<p class='anima-status'>{html.escape(message)}</p>")


def _failed(error: Exception) -> tuple[dict, dict, str]:
    return gr.update(), gr.update(), f"<p class='anima-error'>{html.escape(str(error))}</p>"


def _delete(name: str | None, confirmed: bool) -> tuple:
    """The Delete button, after the browser's confirmation: what ``DELETE /anima/v1/contexts/{name}`` runs."""
    if not name or not confirmed:
        return gr.update(), gr.update(), "<p class='anima-status'>Nothing deleted.</p>"
    try:
        removed = store.library().delete(name)
    except (AnimaError, OSError) as e:
        return _failed(e)
    return _done(f"Deleted {name}: {', '.join(os.path.basename(p) for p in removed)}")


def _rename(name: str | None, new_name: str, overwrite: bool, confirmed: bool) -> tuple:
    """The Rename button, after the browser's confirmation: what ``POST /anima/v1/contexts/{name}/rename`` runs."""
    if not name or not confirmed:
        return gr.update(), gr.update(), "<p class='anima-status'>Nothing renamed.</p>"
    try:
        store.library().rename(name, check_name((new_name or "").strip()), bool(overwrite))
    except (AnimaError, OSError) as e:
        return _failed(e)
    return _done(f"Renamed {name} to {new_name.strip()}")


# Asks in the browser before the change is sent; the last input (a hidden checkbox) carries the answer.
_CONFIRM_DELETE = "(name, ok) => [name, confirm('Delete the context ' + name + ' and its previews?')]"
_CONFIRM_RENAME = ("(name, to, overwrite, ok) => [name, to, overwrite, "
                   "confirm('Rename the context ' + name + ' to ' + to + (overwrite ? ', replacing it' : '') + '?')]")


def build_contexts() -> dict:
    """The Contexts list with Refresh, Delete and Rename; filled on page load and when its tab is selected."""
    c: dict = {}
    c["refresh"] = gr.Button("Refresh", elem_id="anima_contexts_refresh")
    c["table"] = gr.HTML("", elem_id="anima_contexts_table")
    with FormRow():
        c["chosen"] = gr.Dropdown(label="Context", choices=[], elem_id="anima_contexts_chosen")
        c["new_name"] = gr.Textbox(label="New name", elem_id="anima_contexts_new_name")
        c["overwrite"] = gr.Checkbox(label="Replace an existing context", value=False, elem_id="anima_contexts_overwrite")
    with gr.Row():
        c["rename"] = gr.Button("Rename", elem_id="anima_contexts_rename")
        c["delete"] = gr.Button("Delete", variant="stop", elem_id="anima_contexts_delete")
    c["status"] = gr.HTML(elem_id="anima_contexts_status")
    confirmed = gr.Checkbox(visible=False, value=False)
    changed = [c["table"], c["chosen"], c["status"]]
    c["delete"].click(fn=_delete, _js=_CONFIRM_DELETE, inputs=[c["chosen"], confirmed], outputs=changed)
    c["rename"].click(fn=_rename, _js=_CONFIRM_RENAME,
                      inputs=[c["chosen"], c["new_name"], c["overwrite"], confirmed], outputs=changed)
    return c



# ---- Compare: the scale sweep of an existing context, with a prompt the user types --------------------------------


def _compare(id_task, name, prompt, negative_prompt, seed, steps, size):
    """The Compare button (under wrap_gradio_gpu_call: queue lock, shared.state begun): the same sweep as after
    training (:func:`lib_anima.webui.sweep.render`)."""
    try:
        settings = _compare_settings(prompt, negative_prompt, seed, steps, size)
        if not name:
            raise AnimaError("choose a context to compare")
        result = sweep.render(store.library().load(name), settings)
    except (ValueError, TypeError) as e:  # AnimaError is a ValueError; int(None) a TypeError
        return None, f"<p class='anima-error'>Compare failed: {html.escape(str(e))}</p>"
    if result is None:
        return None, "<p>Compare interrupted.</p>"
    return result.grid, f"<p>{html.escape(name)}: {_sweep_caption(result.record())}</p>"


def _compare_settings(prompt, negative_prompt, seed, steps, size) -> sweep.SweepSettings:
    steps, size, seed = int(steps), int(size), int(seed)
    if not 1 <= steps <= 150:
        raise AnimaError(f"steps must be from 1 to 150, got {steps}")
    if not 0 <= size <= 2048 or size % 8:
        raise AnimaError(f"size must be a multiple of 8 from 0 to 2048, got {size}")
    size = size or (1024 if store.model_arch() == "sdxl" else 512)
    seed = seed if seed >= 0 else random.SystemRandom().randrange(2**31)  # one concrete seed for every cell
    return sweep.SweepSettings(prompt=prompt or "", negative_prompt=negative_prompt or "", seed=seed, steps=steps,
                               width=size, height=size)


def build_compare() -> dict:
    c: dict = {}
    with gr.Row(equal_height=False):
        with gr.Column(variant="panel"):
            c["name"] = gr.Dropdown(store.library().names(), label="Context", elem_id="anima_compare_name")
            c["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="anima_compare_prompt")
            c["negative_prompt"] = gr.Textbox(label="Negative prompt", elem_id="anima_compare_negative_prompt")
            with FormRow():
                c["seed"] = gr.Number(label="Seed (-1: random)", value=0, precision=0, elem_id="anima_compare_seed")
                c["steps"] = gr.Number(label="Steps", value=20, precision=0, elem_id="anima_compare_steps")
                c["size"] = gr.Number(label="Size (0: model's native)", value=0, precision=0, elem_id="anima_compare_size")
            c["compare"] = gr.Button("Compare", variant="primary", elem_id="anima_compare")
        with gr.Column(elem_id="anima_compare_gallery_container"):
            c["output"] = gr.HTML(elem_id="anima_compare_output")
            gr.HTML(elem_id="anima_compare_progress")
            c["image"] = gr.Image(label="Scale sweep: 0, 0.5, 1, 1.5 and 1 negative", interactive=False,
                                  elem_id="anima_compare_preview")
            c["id_task"] = gr.Textbox(visible=False, elem_id="anima_compare_id_task")
    inputs = [c[k] for k in ("id_task", "name", "prompt", "negative_prompt", "seed", "steps", "size")]
    c["compare"].click(fn=call_queue.wrap_gradio_gpu_call(_compare, extra_outputs=[None]),
                       _js="(...args) => animaStartJob('anima_compare', args)",
                       inputs=inputs, outputs=[c["image"], c["output"]])
    return c


def on_ui_train_tabs(_params) -> None:
    with gr.Tab("Anima context", elem_id="anima_train_tab"):
        build_train("anima_train")


def on_ui_tabs():
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Tabs(elem_id="anima_tabs"):
            with gr.Tab("Train", elem_id="anima_tabs_train"):
                form = build_train("anima_tab")
            with gr.Tab("Contexts", elem_id="anima_tabs_contexts") as contexts_tab:
                contexts = build_contexts()
                compare = build_compare()
        listed = [contexts["table"], contexts["chosen"], compare["name"]]
        # the folder changes under a running WebUI (trainings, files dropped in): never show the startup list
        for event in (tab.load, contexts_tab.select, contexts["refresh"].click, form["done"].then):
            event(fn=_listed_everywhere, inputs=[], outputs=listed)
        _bind_send_buttons(form)
    return [(tab, "Anima", "anima")]


def _bind_send_buttons(form: dict) -> None:
    for source, button in _send_buttons.items():
        component = _host_components.get(source)
        if component is None:
            continue
        js = "extract_image_from_gallery" if source.endswith("gallery") else None
        button.click(fn=_received, _js=js, inputs=[component], outputs=[form["image"], form["prompt"]]).then(
            fn=None, _js="animaShowTab", inputs=[], outputs=[])

