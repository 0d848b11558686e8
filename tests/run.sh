#!/usr/bin/env bash
# Runs every test of sd-webui-anima on a fresh machine: lint, core tests (real torch modules: diffusers' UNet, and the
# host's own ldm/sgm modules) and integration tests against a real A1111 v1.10.1 (CPU, tiny random-weight
# checkpoints), HTTP and browser; then the same against real Forge and reForge (tests/forks/run.sh), each fork whose
# source is under $WEBUI_SOURCES (one loud line per fork that is not). Installs what it needs: a venv (.venv), the offline host (../shared/host → webui-host/;
# not a dot folder: the host's Gradio refuses /file= paths under one, and the page would load none of its scripts),
# test tools, Debian's chromium. Extra arguments go to pytest, e.g. `bash tests/run.sh -k infotext`.
# After the main run the host is started twice more: without --api (tests/host_without_api.sh) and with --api-auth,
# each for the tests marked for that kind of host; the exit status reflects every pytest run.
#
# The host source (other projects' code, never in this repository) comes from $WEBUI_SOURCES/stable-diffusion-webui
# (default $HOME/webui-sources; an existing A1111 v1.10.1 install works: point WEBUI_SOURCES at the folder that holds
# it). When it is missing, the core tests still run, every host test is skipped and a loud line says so at the
# start and at the end; the exit status is that of the tests that ran.
#
# Env: WEBUI_SOURCES, ANIMA_VENV (venv dir), WEBUI_HOST_DIR (host dir), ANIMA_PORT (default 7871), ANIMA_SHARED_HOST;
# the fork phases: ANIMA_FORKS, ANIMA_FORK_PORT (default ANIMA_PORT + 10), ANIMA_FORGE_VENV, ANIMA_REFORGE_VENV.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
SHARED_HOST="${ANIMA_SHARED_HOST:-$ROOT/../shared/host}"
VENV="${ANIMA_VENV:-$ROOT/.venv}"
PORT="${ANIMA_PORT:-7871}"
export WEBUI_SOURCES="${WEBUI_SOURCES:-$HOME/webui-sources}"
export WEBUI_HOST_DIR="${WEBUI_HOST_DIR:-$ROOT/webui-host}"
EXT_LINK="$WEBUI_HOST_DIR/extensions/sd-webui-anima"
FAULT_LINK="$WEBUI_HOST_DIR/extensions/fault-injection-test"  # test-only script (tests/integration/test_faults.py)
log() { echo "[anima tests] $*"; }
SKIP_LINE="HOST TESTS SKIPPED: no A1111 v1.10.1 source at $WEBUI_SOURCES/stable-diffusion-webui, so the integration, browser and host-module core tests did not run. Get it as ../shared/host/README.md ('The host source') says, or point WEBUI_SOURCES at the folder that holds your stable-diffusion-webui."
loud() { printf '\n%s\n!!! %s\n%s\n\n' "$(printf '!%.0s' {1..100})" "$1" "$(printf '!%.0s' {1..100})"; }

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
set +e
bash "$SHARED_HOST/setup.sh" "$WEBUI_HOST_DIR"
setup_rc=$?
set -e
case "$setup_rc" in
    0) HOST=1 ;;
    3) HOST=0
       loud "$SKIP_LINE"
       log "installing the host's pinned packages (torch, safetensors, ...) for the core tests"
       python -m pip install -q --disable-pip-version-check -r "$SHARED_HOST/requirements.txt" ;;
    *) log "host setup failed ($setup_rc)"; exit "$setup_rc" ;;
esac
python -m pip install -q --disable-pip-version-check -r requirements-dev.txt

log "lint"
ruff check .

run_forks() {  # the Forge / reForge phases (tests/forks/run.sh: own venvs and hosts, a loud line per missing source)
    log "Forge and reForge (tests/forks/run.sh)"
    set +e
    ANIMA_FORK_PORT="${ANIMA_FORK_PORT:-$((PORT + 10))}" bash tests/forks/run.sh "$@"
    forks_rc=$?
    set -e
}

if [ "$HOST" = 0 ]; then
    set +e
    python -m pytest tests/core -q -rs --durations=15 "$@"
    rc=$?
    set -e
    run_forks "$@"
    loud "$SKIP_LINE"
    [ "$rc" = 0 ] || exit "$rc"
    exit "$forks_rc"
fi

if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ]; then
    log "installing Debian's chromium for the browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi

stop_host() { bash "$SHARED_HOST/stop.sh" "$WEBUI_HOST_DIR" >/dev/null || true; }
start_host() {  # $1 port; retried: the host's warm-up request can race its own start-up (seen once: HTTP 500)
    for attempt in 1 2 3; do
        wait_port_free "$1" && bash "$SHARED_HOST/start.sh" "$1" "$WEBUI_HOST_DIR" >/dev/null && return 0
        log "host start failed (attempt $attempt); retrying"
        stop_host
        sleep 3
    done
    return 1
}
wait_port_free() {  # a stopped server's socket can linger for a moment
    for _ in $(seq 1 60); do
        python -c "import socket,sys; s=socket.socket(); sys.exit(0 if s.connect_ex(('127.0.0.1', $1)) else 1)" && return 0
        sleep 0.5
    done
    log "port $1 is still in use"; return 1
}
remove_thirdparty() {  # the copies ../shared/host/thirdparty/install.sh made (each carries THIRDPARTY_SOURCE.txt)
    for dir in "$WEBUI_HOST_DIR"/extensions/*/; do
        [ -f "$dir/THIRDPARTY_SOURCE.txt" ] && rm -rf "$dir"
    done
    return 0
}
trap stop_host EXIT
stop_host
remove_thirdparty  # the baseline and the main suite run next to no other extension

log "baseline images from the host WITHOUT the extension"
rm -f "$EXT_LINK" "$FAULT_LINK"
BASELINE="$(mktemp -d)"
BASE_PORT=$((PORT + 1))
start_host "$BASE_PORT"
ANIMA_WEBUI_URL="http://127.0.0.1:$BASE_PORT" python -m tests.integration.baseline "$BASELINE"
stop_host

log "host WITH the extension"
ln -sfn "$ROOT" "$EXT_LINK"
ln -sfn "$ROOT/tests/fixtures/anima_fault_ext" "$FAULT_LINK"
WEBUI_ARGS="--anima-debug-rows" start_host "$PORT"
export ANIMA_WEBUI_URL="http://127.0.0.1:$PORT" ANIMA_BASELINE_DIR="$BASELINE"
set +e
python -m pytest tests -q -rs --durations=15 --ignore=tests/thirdparty --ignore=tests/forks "$@"
rc=$?
set -e

# ---- begin: hosts started another way (without --api; with --api-auth) ----------------------------------------
# Each kind runs the integration tests marked for it (pytest.mark.host, tests/integration/conftest.py) against
# its own start on $PORT; their statuses join rc. "No test selected" (exit 5) only counts when arguments narrowed
# the run (e.g. -k infotext), and then it is not a failure.
pytest_on_host() {  # $1 host kind; the rest: pytest arguments
    local kind="$1" status
    shift
    set +e
    ANIMA_HOST_KIND="$kind" python -m pytest tests/integration -q -rs "$@"
    status=$?
    set -e
    if [ "$status" = 5 ] && [ "$NARROWED" = 1 ]; then status=0; fi
    if [ "$status" != 0 ]; then log "tests on the $kind host failed ($status)"; rc=1; fi
}
NARROWED=$([ "$#" -gt 0 ] && echo 1 || echo 0)
stop_host

log "host WITHOUT --api (tests/host_without_api.sh: the anima routes must not exist, the UI must work)"
if wait_port_free "$PORT" && bash tests/host_without_api.sh "$PORT" "$WEBUI_HOST_DIR" >/dev/null; then
    pytest_on_host no-api "$@"
else
    log "the host without --api did not start"; rc=1
fi
stop_host

log "host with --api-auth (every anima route must need the credentials)"
if WEBUI_API_AUTH=anima-test:s3cret-pass start_host "$PORT"; then
    ANIMA_API_AUTH=anima-test:s3cret-pass pytest_on_host api-auth "$@"
else
    log "the host with --api-auth did not start"; rc=1
fi
stop_host
# ---- end: hosts started another way ------------------------------------------------------------------------------


log "next to third-party extensions (../shared/host/thirdparty: Tiled Diffusion, ControlNet, SAG, ...)"
stop_host
THIRDPARTY="$SHARED_HOST/thirdparty"
set +e
bash "$THIRDPARTY/install.sh" "$WEBUI_HOST_DIR"
tp_rc=$?
set -e
[ "$tp_rc" = 0 ] || [ "$tp_rc" = 3 ] || { log "third-party install failed ($tp_rc)"; exit "$tp_rc"; }
ANIMA_THIRDPARTY="$(grep -v '^#' "$THIRDPARTY/extensions.tsv" | while IFS=$'\t' read -r name dir _; do
    [ -f "$WEBUI_HOST_DIR/extensions/$dir/THIRDPARTY_SOURCE.txt" ] && printf '%s ' "$name"; done)"
export ANIMA_THIRDPARTY
TP_SKIP_LINE="THIRD-PARTY TESTS PARTLY SKIPPED: installed only [${ANIMA_THIRDPARTY% }] of the extensions in $THIRDPARTY/extensions.tsv; the rest have no source under $WEBUI_SOURCES/extensions (its README says how to get each)."
[ "$tp_rc" = 0 ] || loud "$TP_SKIP_LINE"
WEBUI_ARGS="--anima-debug-rows --ad-no-huggingface" start_host "$PORT"
set +e
python -m pytest tests/thirdparty -q -rs "$@"
tp_tests_rc=$?
set -e
[ "$tp_tests_rc" = 5 ] && [ $# -gt 0 ] && tp_tests_rc=0  # a -k for the main suite may select none here
stop_host
remove_thirdparty
run_forks "$@"
[ "$tp_rc" = 0 ] || loud "$TP_SKIP_LINE"
[ "$rc" = 0 ] || exit "$rc"
[ "$tp_tests_rc" = 0 ] || exit "$tp_tests_rc"
exit "$forks_rc"
