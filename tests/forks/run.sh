#!/usr/bin/env bash
# The Forge and reForge phases of tests/run.sh (also runnable alone): for each fork whose source is under
# $WEBUI_SOURCES, set up its offline host from ../shared/forge-host (own venv: the forks' pins differ from A1111's and
# from each other), render baseline images WITHOUT the extension, then start it WITH the extension (and the test-only
# attn2-replace fixture) and run tests/forks plus the tests of tests/integration marked `forks` (the browser test on
# reForge). A fork without its source is one loud skip line. Extra arguments go to pytest.
#
# Env: WEBUI_SOURCES, ANIMA_FORKS (default "forge reforge"), ANIMA_FORK_PORT (default 7911; each fork uses two ports
# from it), ANIMA_FORGE_VENV / ANIMA_REFORGE_VENV (default .venv-forge / .venv-reforge), ANIMA_FORGE_HOST (default
# ../shared/forge-host). Exit status: 0 when every fork that ran passed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT="$PWD"
FORGE_HOST="${ANIMA_FORGE_HOST:-$ROOT/../shared/forge-host}"
export WEBUI_SOURCES="${WEBUI_SOURCES:-$HOME/webui-sources}"
FORK_PORT="${ANIMA_FORK_PORT:-7911}"
log() { echo "[anima fork tests] $*"; }
loud() { printf '\n%s\n!!! %s\n%s\n\n' "$(printf '!%.0s' {1..100})" "$1" "$(printf '!%.0s' {1..100})"; }
declare -A SOURCE=([forge]=stable-diffusion-webui-forge [reforge]=stable-diffusion-webui-reForge)
# what each fork runs: tests/forks, and the tests of tests/integration marked `forks`; in a browser, Forge's Gradio 4
# page (tests/forks/test_fork_ui.py) and reForge's Gradio 3.41 page (the A1111 browser test)
FORK_TESTS="tests/forks/test_fork_generation.py tests/forks/test_fork_training.py"
MARKED="tests/integration/test_generation.py tests/integration/test_api_contexts.py tests/integration/test_training.py"
declare -A SUITE=(
    [forge]="$FORK_TESTS tests/forks/test_fork_ui.py $MARKED"
    [reforge]="$FORK_TESTS $MARKED tests/integration/test_browser.py"
)
STARTED=()
start_fork() {  # $1 port, $2 dir; retried: a warm-up request can race the fork's own start-up
    for attempt in 1 2; do
        bash "$FORGE_HOST/start.sh" "$1" "$2" >/dev/null && return 0
        log "start failed (attempt $attempt)"
        bash "$FORGE_HOST/stop.sh" "$2" >/dev/null 2>&1 || true
        sleep 3
    done
    return 1
}
stop_all() { for dir in "${STARTED[@]}"; do bash "$FORGE_HOST/stop.sh" "$dir" >/dev/null 2>&1 || true; done; }
trap stop_all EXIT

run_fork() {  # $1 fork, $2 port; the fork's status is its return value
    local fork="$1" port="$2" base_port=$(($2 + 1)) rc=0
    local dir="$ROOT/$fork-host" venv_var="ANIMA_${fork^^}_VENV"
    local venv="${!venv_var:-$ROOT/.venv-$fork}"
    local ext="$dir/extensions/sd-webui-anima" fixture="$dir/extensions/anima-attn2-replace-test"
    shift 2  # the rest goes to pytest
    if [ ! -d "$WEBUI_SOURCES/${SOURCE[$fork]}" ]; then
        loud "${fork^^} TESTS SKIPPED: no source at $WEBUI_SOURCES/${SOURCE[$fork]} (../shared/forge-host/README.md, 'The host source', says how to get it at the commit its tests use)."
        return 0
    fi
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    local setup_rc=0
    (source "$venv/bin/activate" && bash "$FORGE_HOST/setup.sh" "$fork" "$dir") || setup_rc=$?
    if [ "$setup_rc" = 3 ]; then
        loud "${fork^^} TESTS SKIPPED: its host could not be set up from $WEBUI_SOURCES (setup.sh exit 3: a repository it needs is missing; see its log above)."
        return 0
    fi
    [ "$setup_rc" = 0 ] || { log "$fork host setup failed ($setup_rc)"; return "$setup_rc"; }
    # only the test tools the fork suite needs, at requirements-dev.txt's pins (ruff and diffusers stay the fork's)
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        $(grep -E '^(pytest|playwright)==' requirements-dev.txt)
    STARTED+=("$dir")
    log "$fork: baseline images from the fork WITHOUT the extension"
    rm -f "$ext" "$fixture"
    local baseline
    baseline="$(mktemp -d)"
    start_fork "$base_port" "$dir"
    ANIMA_WEBUI_URL="http://127.0.0.1:$base_port" "$venv/bin/python" -m tests.forks.cases "$baseline"
    bash "$FORGE_HOST/stop.sh" "$dir" >/dev/null
    log "$fork WITH the extension"
    ln -sfn "$ROOT" "$ext"
    ln -sfn "$ROOT/tests/fixtures/anima_attn2_replace_ext" "$fixture"
    WEBUI_ARGS="--anima-debug-rows" start_fork "$port" "$dir"
    # shellcheck disable=SC2086
    ANIMA_FORK="$fork" ANIMA_WEBUI_URL="http://127.0.0.1:$port" WEBUI_HOST_DIR="$dir" ANIMA_BASELINE_DIR="$baseline" \
        "$venv/bin/python" -m pytest ${SUITE[$fork]} -m forks -q -rs --durations=5 -p no:cacheprovider "$@" || rc=$?
    [ "$rc" = 5 ] && [ $# -gt 0 ] && rc=0  # a -k for other suites may select none here
    bash "$FORGE_HOST/stop.sh" "$dir" >/dev/null
    rm -f "$ext" "$fixture"
    rm -rf "$baseline"
    log "$fork: pytest exit $rc"
    return "$rc"
}

status=0
port="$FORK_PORT"
for fork in ${ANIMA_FORKS:-forge reforge}; do
    run_fork "$fork" "$port" "$@" || status=1
    port=$((port + 2))
done
exit "$status"
