#!/usr/bin/env bash
# The main job: a WebUI with the extension makes a reference context and generates with and without it,
# writing a side-by-side image to out/anima_demo.png.
#   WEBUI_URL=http://127.0.0.1:7860 bash demo/run.sh   # use your running WebUI (extension installed, --api)
#   bash demo/run.sh                                    # else: a throwaway offline A1111 host (../shared/host)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
SHARED_HOST="${ANIMA_SHARED_HOST:-$ROOT/../shared/host}"
VENV="${ANIMA_VENV:-$ROOT/.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if [ -z "${WEBUI_URL:-}" ]; then
    export WEBUI_HOST_DIR="${WEBUI_HOST_DIR:-$ROOT/webui-host}"
    PORT="${ANIMA_DEMO_PORT:-7881}"
    bash "$SHARED_HOST/setup.sh" "$WEBUI_HOST_DIR"
    ln -sfn "$ROOT" "$WEBUI_HOST_DIR/extensions/sd-webui-anima"
    trap 'bash "$SHARED_HOST/stop.sh" "$WEBUI_HOST_DIR" >/dev/null || true' EXIT
    bash "$SHARED_HOST/start.sh" "$PORT" "$WEBUI_HOST_DIR" >/dev/null
    WEBUI_URL="http://127.0.0.1:$PORT"
fi
python -m pip install -q --disable-pip-version-check requests==2.34.2
python demo/demo.py --url "$WEBUI_URL" --out "$ROOT/out/anima_demo.png"
