"""The "Anima" page of the Extra Networks pane: a card per context, and the user-metadata editor."""

from __future__ import annotations

import json
import logging
import os

import gradio as gr
from modules import shared, ui_extra_networks, ui_extra_networks_user_metadata
from modules.ui_extra_networks import quote_js

from lib_anima import cards
from lib_anima.context import MODES, SCALE_MAX
from lib_anima.errors import AnimaError
from lib_anima.webui import store

log = logging.getLogger("anima")


def _format_number(value: float) -> str:
    return f"{float(value):g}"


def _description_is_html() -> bool:
    return bool(getattr(shared.opts, "extra_networks_card_description_is_html", False))


class ExtraNetworksPageAnima(ui_extra_networks.ExtraNetworksPage):
    def __init__(self) -> None:
        super().__init__("Anima")

    def refresh(self) -> None:
        store.library().refresh()

    def create_item(self, name: str, index: int | None = None, enable_filter: bool = True) -> dict:
        try:
            return self._item(name, index)
        except Exception as e:  # noqa: BLE001 - any failure, a bug too: a visible broken card, never a missing one
            path = os.path.join(store.contexts_dir(), f"{name}.safetensors")
            log.exception("anima: the Extra Networks card for %s could not be built", path)
            return self._broken_item(name, path, index, e)

    def _item(self, name: str, index: int | None) -> dict:
        info = store.library().info(name)
        path = info.path
        base, _ = os.path.splitext(path)
        training = info.training
        item = {
            "name": name,
            "filename": path,
            "shorthash": info.shorthash,
            "preview": self.find_preview(base),
            "description": self.find_description(base)
            or cards.fallback_description(training, _description_is_html()),
            "search_terms": cards.search_terms([self.search_terms_from_path(path), info.shorthash, info.arch,
                                                cards.training_prompt(training)]),
            "local_preview": f"{base}.preview.{shared.opts.samples_format}",
            "metadata": {
                "architecture": info.arch, "sites": info.n_sites, "tokens per site": info.n_tokens,
                "context_dim": info.context_dim, "training": training,
            },
            "sort_keys": {"default": index, **self.get_sort_keys(path)},
        }
        self.read_user_metadata(item)
        user = item["user_metadata"]
        where = f"{base}.json"
        scale = cards.user_scale(user, info.default_scale, where)
        mode = cards.user_mode(user, info.default_mode, where)
        suffix = "" if mode == "positive" else f":mode={mode}"
        item["prompt"] = quote_js(f"<anima:{name}:{_format_number(scale)}{suffix}>")
        activation_text = user.get("activation text")
        if activation_text:
            item["prompt"] += " + " + quote_js(" " + str(activation_text))
        return item

    def _broken_item(self, name: str, path: str, index: int | None, error: Exception) -> dict:
        """A card that says why it could not be built (the log has the traceback); clicking it still inserts the
        context at the default scale, whose problems then show as the usual warnings."""
        problem = str(error) if isinstance(error, AnimaError) else f"{type(error).__name__}: {error}"
        description = f"⚠ broken card: {problem} (see the WebUI log)"
        base, _ = os.path.splitext(path)
        try:
            sort_keys = self.get_sort_keys(path)
        except Exception:  # noqa: BLE001 - the file may be gone: sort it by name
            sort_keys = {"name": name.lower(), "path": path.lower()}
        return {
            "name": name, "filename": path, "shorthash": "", "preview": None,
            "description": cards.text(description) if _description_is_html() else description,
            "search_terms": cards.search_terms([name, "broken"]),
            "local_preview": f"{base}.preview.{shared.opts.samples_format}",
            "metadata": {}, "sort_keys": {"default": index, **sort_keys},
            "user_metadata": {"description": description}, "prompt": quote_js(f"<anima:{name}>"),
        }

    def list_items(self):
        for index, name in enumerate(list(store.library().names())):
            yield self.create_item(name, index)

    def allowed_directories_for_previews(self) -> list[str]:
        return [store.contexts_dir()]

    def create_user_metadata_editor(self, ui, tabname):
        return AnimaUserMetadataEditor(ui, tabname, self)


class AnimaUserMetadataEditor(ui_extra_networks_user_metadata.UserMetadataEditor):
    """Notes, description, default scale and mode, activation text — stored in ``name.json`` beside the file."""

    def __init__(self, ui, tabname, page) -> None:
        super().__init__(ui, tabname, page)
        self.slider_scale = None
        self.radio_mode = None
        self.edit_activation_text = None

    def save_anima_user_metadata(self, name, desc, scale, mode, activation_text, notes) -> None:
        user_metadata = self.get_user_metadata(name)
        user_metadata.update({
            "description": desc, "preferred weight": scale, "mode": mode,
            "activation text": activation_text, "notes": notes,
        })
        self.write_user_metadata(name, user_metadata)

    def get_metadata_table(self, name):
        # the host puts each value into its table's HTML as it is: every one is escaped (they come from files)
        rows = list(super().get_metadata_table(name))
        meta = self.page.items.get(name, {}).get("metadata") or {}
        if meta:
            rows += cards.context_rows(meta.get("architecture"), meta.get("sites"), meta.get("tokens per site"),
                                       meta.get("context_dim"), meta.get("training") or {})
        return cards.table_rows(rows)

    def put_values_into_components(self, name):
        user_metadata = self.get_user_metadata(name)
        values = super().put_values_into_components(name)
        return [
            *values[0:4],
            user_metadata.get("preferred weight", 1.0) or 1.0,
            user_metadata.get("mode", "positive") or "positive",
            user_metadata.get("activation text", ""),
            values[4],
        ]

    def create_editor(self) -> None:
        self.create_default_editor_elems()
        self.slider_scale = gr.Slider(label="Default scale", minimum=0.0, maximum=SCALE_MAX, step=0.05, value=1.0)
        self.radio_mode = gr.Radio(list(MODES), label="Default mode", value="positive")
        self.edit_activation_text = gr.Text(label="Activation text", info="Added to the prompt with the context")
        self.edit_notes = gr.TextArea(label="Notes", lines=4)
        self.create_default_buttons()
        viewed = [self.edit_name, self.edit_description, self.html_filedata, self.html_preview,
                  self.slider_scale, self.radio_mode, self.edit_activation_text, self.edit_notes]
        self.button_edit.click(fn=self.put_values_into_components, inputs=[self.edit_name_input], outputs=viewed)\
            .then(fn=lambda: gr.update(visible=True), inputs=[], outputs=[self.box])
        edited = [self.edit_description, self.slider_scale, self.radio_mode, self.edit_activation_text, self.edit_notes]
        self.setup_save_handler(self.button_save, self.save_anima_user_metadata, edited)


def metadata_json(name: str) -> str:
    return json.dumps(store.library().info(name).metadata, indent=2)
