"""Rows the injection cannot place are never silent: an extension that gives the UNet a text conditioning of its own
(the fault-injection script's XFAULT_FOREIGN) gets no context, the image says so in `Anima warnings`, and the
context's `Anima N` entry is left out of the infotext (it reached no UNet call)."""

from __future__ import annotations

from tests.integration import webui_client as client
from tests.integration.webui_client import txt2img


def test_unplaced_rows_are_warned_and_the_context_is_not_claimed(ctx):
    plain = txt2img("a photo of a dog XFAULT_FOREIGN")
    with_ctx = txt2img(f"a photo of a dog XFAULT_FOREIGN <anima:{ctx['name']}:1>")
    assert (with_ctx.pixels() == plain.pixels()).all()
    assert "Anima 1:" not in with_ctx.infotext
    assert "got no context" in with_ctx.infotext and "reached no UNet call" in with_ctx.infotext, with_ctx.infotext
    rows = client.last_rows()
    assert rows["reached"] == {ctx["name"]: False}
    assert rows["calls"] and all(c["unplaced"] == [0, 1] and not c["cond"] and not c["uncond"] for c in rows["calls"])
    assert client.status()["hooks_installed"] == 0


def test_the_same_request_without_the_foreign_conditioning_is_placed(ctx):
    with_ctx = txt2img(f"a photo of a dog <anima:{ctx['name']}:1>")
    assert "Anima 1:" in with_ctx.infotext and "Anima warnings" not in with_ctx.infotext
    client.assert_rows({2: ([0], [1])})
