"""One generation path: panel/API units and prompt units → an InjectionSession around sampling.

The script's ``process`` and the extra network's ``activate`` both record their units on the processing object
``p`` and make sure ``p.sample`` is wrapped. The wrapper installs the hooks just before sampling and removes
them in ``finally`` (success, exception, interrupt). The host's ``on_cfg_denoiser`` callback tells the tracker,
each step, what the conditional and unconditional rows are conditioned on (and the host's layout), so that every
cross-attention call finds its own rows (:class:`lib_anima.inject.RowTracker`).

Never silent: rows the tracker could not place are reported once per image in ``Anima warnings``, and an
``Anima N`` infotext entry is written only for a context that reached at least one UNet call.
"""

from __future__ import annotations

import logging

from lib_anima import infotext
from lib_anima.errors import AnimaError
from lib_anima.inject import Activation, CallRecord, ChunkRows, InjectionSession, RowTracker, check_fits
from lib_anima.layout import find_sites
from lib_anima.patching import PatchSession
from lib_anima.units import ContextUnit
from lib_anima.webui import host, store

log = logging.getLogger("anima")

_active_run: RunState | None = None
record_rows = False  # set by --anima-debug-rows: keep each run's CallRecords for tests (webui/debug.py)
last_records: list[CallRecord] = []
last_reached: dict[str, bool] = {}


class RunState:
    """What one processing object asked for and the session applying it."""

    def __init__(self) -> None:
        self.panel: list[ContextUnit] = []
        self.prompt: list[ContextUnit] = []
        self.in_memory: list[Activation] = []  # contexts not in the library (training previews)
        self.session: InjectionSession | PatchSession | None = None
        # A1111 tells rows apart by their text; the forks say which chunk of a call is which
        self.tracker = ChunkRows(record=record_rows) if host.is_fork() else RowTracker(record=record_rows)
        self.applied: list[tuple[ContextUnit, str, Activation]] = []
        self.sampling = False
        self.p = None  # the processing object while it samples
        self.warned: set[str] = set()

    def units(self) -> list[ContextUnit]:
        return [u for u in self.panel + self.prompt if u.scale != 0.0]

    def warn(self, p, message: str) -> None:
        if message in self.warned:
            return
        self.warned.add(message)
        log.warning("anima: %s", message)
        if hasattr(p, "comment"):  # shown under the image in the UI
            p.comment(f"Anima: {message}")
            # and in the infotext, so API clients see it too
            p.extra_generation_params["Anima warnings"] = "; ".join(sorted(self.warned))

    def start(self, p) -> None:
        global _active_run
        self.p = p
        self.sampling = True
        _active_run = self
        self.install(p)

    def stop(self) -> None:
        global _active_run
        p, self.p = self.p, None
        self.sampling = False
        self.uninstall()
        if _active_run is self:
            _active_run = None
        if p is not None:
            self.report(p)

    def report(self, p) -> None:
        """After sampling: infotext entries only for contexts that reached a UNet call; unplaced rows as a warning."""
        global last_records, last_reached
        for key in [k for k in p.extra_generation_params if infotext.is_entry_key(k)]:
            del p.extra_generation_params[key]
        reached = [(unit, shorthash) for unit, shorthash, act in self.applied if act.reached]
        p.extra_generation_params.update(infotext.generation_params(reached))
        for unit, _, act in self.applied:
            if not act.reached:
                self.warn(p, f"{unit.name} reached no UNet call (its start/end window held no step, or no row "
                             "could be placed); it is left out of the infotext")
        tracker = self.tracker
        if tracker.unknown_calls:
            self.warn(p, f"{tracker.unplaced_rows} row(s) in {tracker.unknown_calls} UNet call(s) got no context: "
                         "their text conditioning matched neither the prompt nor the negative prompt (another "
                         "extension built its own, e.g. per-region or per-tile prompts)")
        if tracker.record:
            last_records = list(tracker.records)
            last_reached = {unit.name: act.reached for unit, _, act in self.applied}

    def uninstall(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.remove()

    def install(self, p) -> None:
        """(Re)build the session for the current model from the units; skip what does not fit, with a warning."""
        self.uninstall()
        unet = store.current_unet()
        units = self.units()
        if unet is None or not (units or self.in_memory):
            return
        if not _has_sites(unet):
            self.applied = []
            self.warn(p, f"the loaded model ({type(unet).__name__}) is not a UNet with text cross-attention "
                         "(attn2); contexts work on SD1.x, SD2.x and SDXL models only and were not applied")
            return
        activations = list(self.in_memory)
        reached = {unit.name: act.reached for unit, _, act in self.applied}  # a reinstall (hires, refiner) keeps it
        self.applied = []
        for unit in units:
            activation = self._activation(p, unit, unet)
            if activation is not None:
                activation.reached = reached.get(unit.name, False)
                activations.append(activation)
                self.applied.append((unit, activation.context.shorthash, activation))
        if not activations:
            return
        session = _session(unet, activations, self.tracker)
        if getattr(session, "unreachable", None):
            self.warn(p, f"{len(session.unreachable)} site(s) are not in the fork's block layout and get no "
                         f"context: {', '.join(session.unreachable[:3])}")
        session.install()
        self.session = session
        # written now (hires and other passes read it before sampling ends); report() keeps only what reached a call
        p.extra_generation_params.update(infotext.generation_params([(u, h) for u, h, _ in self.applied]))

    def _activation(self, p, unit: ContextUnit, unet) -> Activation | None:
        try:
            context = store.library().load(unit.name)
            activation = Activation(context, unit.scale, unit.mode, unit.start, unit.end, unit.weights or None)
            check_fits(unet, activation)
            return activation
        except AnimaError as e:
            self.warn(p, f"{unit.name} skipped: {e}")
            return None

    def on_step(self, p, params) -> None:
        if self.session is not None and self.session.unet is not store.current_unet():
            # the refiner (or another checkpoint) took over mid-run: re-check the contexts against it
            self.warn(p, "the model changed during sampling; contexts were re-checked against the new model")
            self.install(p)
        n_cond = _crossattn(params.text_cond).shape[0]

        def text():  # read at the first cross-attention call: after every other extension's callback changed them
            return _crossattn(params.text_cond), _crossattn(params.text_uncond)

        self.tracker.begin_step(int(n_cond), int(params.x.shape[0]), int(params.sampling_step),
                                int(params.total_sampling_steps), text=text)


def _upcast_attention() -> bool:
    from modules import shared

    return bool(getattr(shared.opts, "upcast_attn", False))


def _session(unet, activations: list[Activation], tracker) -> InjectionSession | PatchSession:
    if host.is_fork():  # attached to the fork's UNet patcher in before_sampling()
        return PatchSession(unet, activations, tracker, reader=host.weight_reader)
    return InjectionSession(unet, activations, tracker, upcast=_upcast_attention())


def _has_sites(unet) -> bool:
    try:
        find_sites(unet)
    except AnimaError:
        return False
    return True


def before_sampling(p) -> None:
    """Every sampling pass on a fork (the script's ``process_before_every_sampling``, after the fork reset its
    ``forge_objects``): sample with a clone of the UNet patcher that carries the run's patches."""
    run = getattr(p, "_anima_run", None)
    if not isinstance(run, RunState) or not isinstance(run.session, PatchSession):
        return
    forge_objects = getattr(p.sd_model, "forge_objects", None)
    if forge_objects is not None and forge_objects.unet is not None:
        forge_objects.unet = run.session.attach(forge_objects.unet)


def _crossattn(cond):
    """The cross-attention part of a conditioning (SDXL's is a dict with the pooled ``vector`` beside it)."""
    return cond["crossattn"] if isinstance(cond, dict) else cond


def run_state(p) -> RunState:
    """The run state of `p`, created on first use together with the wrapper around `p.sample`."""
    run = getattr(p, "_anima_run", None)
    if run is None:
        run = RunState()
        p._anima_run = run
        _wrap_sample(p, run)
    return run


def _wrap_sample(p, run: RunState) -> None:
    original = p.sample

    def sample(*args, **kwargs):
        try:
            run.start(p)  # inside the try: a failure half-way through installing still ends in stop()
            return original(*args, **kwargs)
        finally:
            run.stop()

    p.sample = sample


def set_prompt_units(p, units: list[ContextUnit]) -> None:
    run = run_state(p)
    run.prompt = units
    if run.sampling:  # hires pass: its own prompt's contexts replace the first pass's
        run.install(p)


def add_in_memory(p, activation: Activation) -> None:
    """Apply a context that is not in the library (a training preview) during `p`'s sampling."""
    run_state(p).in_memory.append(activation)


def on_cfg_denoiser(params) -> None:
    # The run of the processing object being sampled: state lives on `p`, so two requests never share it.
    p = getattr(params.denoiser, "p", None)
    run = getattr(p, "_anima_run", None)
    if not isinstance(run, RunState) or not run.sampling:
        run = _active_run  # a denoiser without `p` (other samplers' wrappers): the one run that is sampling
    if run is None:
        return
    run.on_step(run.p, params)


def hooks_installed() -> int:
    """Hook handles currently held by an active session (0 outside sampling): for tests and status."""
    if _active_run is not None and isinstance(_active_run.session, PatchSession):
        return 2 if _active_run.session.installed else 0  # its attn2 and attn2-output patches
    unet = store.current_unet()
    if unet is None:
        return 0
    count = len(unet._forward_pre_hooks)
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            count += len(module._forward_hooks)
    return count
