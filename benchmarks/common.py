"""Shared helpers of the benchmark scripts: a benchmark host, HTTP calls, peak memory, statistics, records, plots.

Every benchmark writes ``benchmarks/results/<name>/latest.json`` (the numbers plus the command, machine, commit
and time) and ``latest.png`` (a plot), replacing the previous run's. Benchmarks are scripts, not tests: they
measure, print ratios and never fail on a slow number.

A benchmark host is the offline A1111 of ``../shared/host`` (or any running WebUI given by ``--url``), set up in
its own folder and started on its own port so that it never disturbs a test run's host.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SHARED_HOST = os.environ.get("ANIMA_SHARED_HOST", os.path.join(ROOT, "..", "shared", "host"))
DEFAULT_HOSTS = os.environ.get("ANIMA_BENCH_HOSTS", os.path.join(ROOT, "benchmarks", ".hosts"))
EXTENSION_LINK = "sd-webui-anima"
MIB = 1024 * 1024
# Why 1 by default: with 2+ OpenMP threads on a machine whose cores are busy with other work, libgomp's spinning at
# every parallel region's barrier decides the timings, and it depends on how many OpenMP threads the process has
# made so far (seen here: the same host made 12 steps in 2.8 s with this extension installed and 17 s without it,
# identical images, 2 threads; with 1 thread both took 2.3-2.6 s). One thread measures the work, not the spinning.
THREADS_HELP = "torch threads (OMP_NUM_THREADS) of hosts started here; 0: the host's default (default: 1, see common.py)"


# ---- the record -----------------------------------------------------------------------------------------------


def command_line() -> str:
    """How this benchmark was run, as one could type it again from the repository root."""
    module = os.path.splitext(os.path.relpath(sys.argv[0], ROOT))[0].replace(os.sep, ".")
    return " ".join(["python", "-m", module, *map(shlex.quote, sys.argv[1:])])


def commit() -> dict[str, Any]:
    """The checkout measured: HEAD and the tracked files changed since (take it when the run starts)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "subject": git("log", "-1", "--format=%s").strip(),
            "modified_files": changed}


def begin() -> dict[str, Any]:
    """When and on which checkout a run starts (the hosts load the code at their start, so that is what counts)."""
    return {"time": time.time(), "git": commit()}


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "load_average_at_start": list(os.getloadavg()),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_record(name: str, results: dict[str, Any], started: dict[str, Any], figure: Any = None) -> tuple[str, str | None]:
    """Write results/<name>/latest.json (and latest.png from a matplotlib figure); returns their paths."""
    folder = os.path.join(RESULTS, name)
    os.makedirs(folder, exist_ok=True)
    record = {
        "benchmark": name, "command": command_line(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started["time"], 1), "machine": machine(), "git": started["git"], **results,
    }
    json_path = os.path.join(folder, "latest.json")
    _atomic_write(json_path, (json.dumps(record, indent=1, default=_plain) + "\n").encode())
    png_path = None
    if figure is not None:
        png_path = os.path.join(folder, "latest.png")
        tmp = png_path + ".tmp"
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, png_path)
    return json_path, png_path


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pyplot():
    """matplotlib without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- statistics -----------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def quartiles(values: Sequence[float]) -> tuple[float, float] | None:
    values = sorted(v for v in values if v is not None)
    if len(values) < 2:
        return None
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# ---- HTTP -----------------------------------------------------------------------------------------------------


def call(url: str, path: str, payload: dict | None = None, timeout: float = 600, method: str | None = None) -> Any:
    """One API call; a clear error with the server's answer on any non-2xx status."""
    verb = method or ("POST" if payload is not None else "GET")
    r = requests.request(verb, url.rstrip("/") + path, json=payload, timeout=timeout)
    if not r.ok:
        raise RuntimeError(f"{verb} {path}: HTTP {r.status_code}: {r.text[:500]}")
    return r.json() if r.content else None


# ---- memory and CPU of the server process ---------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class PeakRSS:
    """Peak resident memory of a process during a ``with`` block, above its level when the block began.

    Exact where the kernel allows resetting the high-water mark (``/proc/PID/clear_refs`` = 5, Linux >= 4.0, same
    user): the peak is then ``VmHWM`` read at the end. Otherwise a thread samples ``VmRSS`` every 10 ms (a peak
    shorter than that can be missed). ``method`` says which was used.
    """

    pid: int
    before_mib: float = 0.0
    peak_mib: float = 0.0
    method: str = ""
    _samples: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        self.before_mib = (_status_kib(self.pid, "VmRSS") or 0) / 1024
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM after resetting it (clear_refs 5)"
        except OSError:
            self.method = "VmRSS sampled every 10 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            kib = _status_kib(self.pid, "VmRSS")
            if kib is not None:
                self._samples.append(kib)
            self._stop.wait(0.01)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self._samples, default=0) / 1024
        else:
            self.peak_mib = (_status_kib(self.pid, "VmHWM") or 0) / 1024

    @property
    def delta_mib(self) -> float:
        return max(0.0, self.peak_mib - self.before_mib)


class ProgressPoller:
    """Polls the host's /sdapi/v1/progress during a job: (seconds since start, job_no) pairs, for the steady
    per-step time of a training run (the host's TI/HN trainers and ours all count steps in ``state.job_no``)."""

    def __init__(self, url: str, every: float = 0.25):
        self.url, self.every = url, every
        self.points: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = 0.0

    def __enter__(self) -> ProgressPoller:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def _run(self) -> None:
        with requests.Session() as s:
            while not self._stop.wait(self.every):
                try:
                    state = s.get(self.url + "/sdapi/v1/progress?skip_current_image=true", timeout=5).json()["state"]
                except (requests.RequestException, ValueError, KeyError):
                    continue
                self.points.append((time.perf_counter() - self._t0, int(state.get("job_no") or 0)))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def seconds_per_step(self, steps: int) -> float | None:
        """Time between the first sight of step >= 1 and the last of a step < `steps`, over the steps between:
        the steady rate, without the set-up before the first step or the saving after the last."""
        first = next(((t, s) for t, s in self.points if 1 <= s < steps), None)
        last = next(((t, s) for t, s in reversed(self.points) if 1 <= s < steps), None)
        if first is None or last is None or last[1] - first[1] < 2:
            return None
        return (last[0] - first[0]) / (last[1] - first[1])


# ---- a benchmark host -------------------------------------------------------------------------------------------


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def pid_listening_on(port: int) -> int | None:
    """The pid of the local process listening on `port` (for --url of a local host), if it can be found."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return conn.pid
    except (ImportError, OSError, RuntimeError):
        pass
    return None


@dataclass
class Host:
    """A WebUI to measure: started here (``dir`` + ``port``) or already running (``url``)."""

    url: str
    pid: int | None = None
    dir: str | None = None  # set when this script started it (and will stop it)

    @property
    def name(self) -> str:
        return self.url


def _run_script(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    cmd = ["bash", os.path.join(SHARED_HOST, script), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def setup_host(host_dir: str, models: str = "sd1") -> None:
    """Install the offline A1111 into `host_dir` (idempotent; minutes the first time)."""
    if os.path.isfile(os.path.join(host_dir, "launch.py")) and os.path.isfile(
            os.path.join(host_dir, "models", "Stable-diffusion", "tiny.safetensors")):
        return
    print(f"[bench] setting up a host in {host_dir} (first time: a few minutes)", flush=True)
    env = {} if "WEBUI_HOST_MODELS" in os.environ else {"WEBUI_HOST_MODELS": models}
    sources = os.environ.get("WEBUI_SOURCES") or os.path.join(os.path.expanduser("~"), "webui-sources")
    if not os.path.isfile(os.path.join(sources, "stable-diffusion-webui", "launch.py")):
        raise SystemExit(f"[bench] no A1111 v1.10.1 source at {sources}/stable-diffusion-webui: set WEBUI_SOURCES to the "
                         "folder that holds your stable-diffusion-webui (../shared/host/README.md, 'The host source'), "
                         "or pass --url of a running WebUI")
    _run_script("setup.sh", host_dir, env=env)


def start_host(host_dir: str, port: int, extension: bool, threads: int | None = None, ckpt: str | None = None,
               extra_env: dict[str, str] | None = None) -> Host:
    """Start the host of `host_dir` on `port`, with or without this extension linked into it."""
    link = os.path.join(host_dir, "extensions", EXTENSION_LINK)
    if os.path.islink(link) or os.path.exists(link):
        if not os.path.islink(link):
            raise RuntimeError(f"{link} is not a link this script made; use another --host-dir")
        os.remove(link)
    if extension:
        os.symlink(ROOT, link)
    for _ in range(60):  # a stopped server's socket can linger for a moment
        if port_free(port):
            break
        time.sleep(0.5)
    else:
        raise RuntimeError(f"port {port} is in use: pass another --port")
    env = {
        # glibc hands big freed blocks back to the system at once, so the resident size follows the live tensors
        # (without it a freed block is kept and reused, and a job's peak would depend on the jobs before it)
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "WEBUI_ARGS": os.environ.get("WEBUI_ARGS", "--disable-console-progressbars"),
        **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
        **({"WEBUI_CKPT": ckpt} if ckpt else {}),
        **(extra_env or {}),
    }
    for attempt in range(3):  # the host's warm-up request can race its own start (seen in tests/run.sh)
        try:
            _run_script("start.sh", str(port), host_dir, env=env)
            break
        except RuntimeError:
            stop_host(Host(url="", dir=host_dir))
            if attempt == 2:
                raise
            time.sleep(3)
    with open(os.path.join(host_dir, ".host", "webui.pid")) as f:
        pid = int(f.read().strip())
    host = Host(url=f"http://127.0.0.1:{port}", pid=pid, dir=host_dir)
    listener = pid_listening_on(port)
    if listener != pid:  # start.sh only waits for an answer on the port: it may be another program's server
        stop_host(host)
        raise RuntimeError(f"port {port} is served by pid {listener}, not by the host started here (pid {pid}); "
                           "pass another --port")
    return host


def free_port(first: int = 7950, last: int = 7999) -> int:
    """A port nobody listens on now (checked again after the start, see start_host)."""
    for port in range(first, last + 1):
        if port_free(port):
            return port
    raise RuntimeError(f"no free port in {first}-{last}: pass --port")


def stop_host(host: Host) -> None:
    if host.dir:
        with contextlib.suppress(RuntimeError):
            _run_script("stop.sh", host.dir)


def attach(url: str) -> Host:
    """A running WebUI given by URL; its pid (for memory figures) when it listens on this machine."""
    url = url.rstrip("/")
    call(url, "/sdapi/v1/sd-models", timeout=30)
    port = int(url.rsplit(":", 1)[1].split("/")[0]) if url.count(":") >= 2 else 80
    host_part = url.split("//", 1)[-1].split(":", 1)[0]
    pid = pid_listening_on(port) if host_part in ("127.0.0.1", "localhost") else None
    return Host(url=url, pid=pid)


@contextlib.contextmanager
def hosts(specs: list[tuple[str | None, str, int, bool]], threads: int | None = None,
          ckpt: str | None = None) -> Iterator[list[Host]]:
    """Hosts for one benchmark: each spec is (url or None, host dir, port (0: a free one), with the extension);
    the ones started here are stopped on the way out, also on errors."""
    started: list[Host] = []
    try:
        out = []
        for url, host_dir, port, extension in specs:
            if url:
                out.append(attach(url))
                continue
            setup_host(host_dir, "sd1" if not ckpt or ckpt == "tiny" else "sd1,sdxl,sd2v")
            host = start_host(host_dir, port or free_port(), extension, threads=threads, ckpt=ckpt)
            started.append(host)
            out.append(host)
        yield out
    finally:
        for host in started:
            stop_host(host)


def host_threads(host: Host) -> int | None:
    """torch threads of a host we started (its OMP_NUM_THREADS), else None (the host's default)."""
    if host.pid is None:
        return None
    try:
        with open(f"/proc/{host.pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"OMP_NUM_THREADS="):
                    return int(item.split(b"=", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def reference_png(size: int = 512, seed: int = 0) -> bytes:
    """A deterministic reference picture (coloured shapes on a gradient), PNG bytes; the same for every method."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.3 + 0.5 * x, 0.2 + 0.6 * y, 0.6 - 0.3 * x * y], axis=-1)
    image = Image.fromarray((base * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        w, h = rng.integers(size // 8, size // 3, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    data = io.BytesIO()
    image.save(data, format="PNG")
    return data.getvalue()
