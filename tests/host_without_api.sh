#!/usr/bin/env bash
# Start the test host WITHOUT the WebUI's --api (for tests/integration/test_no_api.py): a WebUI as many users run it
# (`--listen --gradio-auth u:p`, no API), where the extension's /anima/v1 routes must not exist.
#
#   bash tests/host_without_api.sh PORT [TARGET_DIR]      (stop it with ../shared/host/stop.sh TARGET_DIR)
#
# Why not ../shared/host/start.sh: it always passes --api, and A1111's --api is a store_true flag that nothing in
# COMMANDLINE_ARGS / WEBUI_ARGS can switch off again; its readiness poll also waits for /sdapi/v1/sd-models,
# which such a host never serves. So this runs the same launch.py from the same host dir with start.sh's
# arguments and environment minus --api, writes the same pid/url files (stop.sh stops it as usual), and waits
# for the WebUI's "Startup time:" log line, the model load and the page. Helpers come from the host's
# _common.sh (which dir, which python, "is this pid our WebUI").
set -euo pipefail
SHARED_HOST="${ANIMA_SHARED_HOST:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/../shared/host}"
# shellcheck disable=SC1091
source "$SHARED_HOST/_common.sh"

PORT="${1:?usage: host_without_api.sh PORT [TARGET_DIR]}"
TARGET="$(resolve_target "${2:-}")"
PY="$(host_python "$TARGET")"
HOSTD="$TARGET/.host"
LOG="$HOSTD/webui.log"
URL="http://127.0.0.1:$PORT"
TIMEOUT="${WEBUI_START_TIMEOUT:-180}"
[ -f "$TARGET/launch.py" ] || { echo "[no-api host] no host installed in $TARGET" >&2; exit 1; }
if pid_is_host "$(cat "$HOSTD/webui.pid" 2>/dev/null || true)" "$TARGET"; then
    echo "[no-api host] a host from $TARGET is running: stop.sh first" >&2
    exit 1
fi

ARGS=(--skip-prepare-environment --skip-torch-cuda-test --skip-version-check --skip-install
      --use-cpu all --precision full --no-half --no-download-sd-model --disable-safe-unpickle
      --server-name 127.0.0.1 --port "$PORT" --ckpt "$TARGET/models/Stable-diffusion/tiny.safetensors")
[ -f "$LOG" ] && mv -f "$LOG" "$LOG.prev"
(
    cd "$TARGET"
    export HF_HOME="$HOSTD/hf_home" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
    export HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1
    export MPLCONFIGDIR="$HOSTD/matplotlib" PYTHONPATH="$HOSTD/shims${PYTHONPATH:+:$PYTHONPATH}"
    export COMMANDLINE_ARGS=""  # nothing from the caller's environment may add --api back
    exec $(command -v setsid || true) "$PY" launch.py "${ARGS[@]}" </dev/null >"$LOG" 2>&1
) &
PID=$!
echo "$PID" >"$HOSTD/webui.pid"
echo "$URL" >"$HOSTD/url"

"$PY" - "$URL" "$PID" "$TIMEOUT" "$LOG" <<'EOF' || { tail -n 40 "$LOG" >&2; bash "$SHARED_HOST/stop.sh" "$TARGET" >/dev/null; exit 1; }
import os, sys, time, urllib.request
url, pid, timeout, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
deadline = time.time() + timeout
# No request before "Startup time:" (an early request makes the WebUI fail adding its middleware), then the
# model load (the UI trains on it), then the page itself.
for needle in ("Startup time:", "Model loaded in"):
    while True:
        if not os.path.exists(f"/proc/{pid}"):
            sys.exit(f"[no-api host] the WebUI (pid {pid}) exited during startup")
        with open(log, errors="replace") as f:
            if needle in f.read():
                break
        if time.time() > deadline:
            sys.exit(f"[no-api host] no {needle!r} in {log} within {timeout:.0f}s")
        time.sleep(0.5)
with urllib.request.urlopen(url + "/", timeout=30) as r:
    assert r.status == 200, r.status
print(f"[no-api host] ready: {url} (pid {pid}), started without --api")
EOF
echo "$URL"
