#!/usr/bin/env bash
# Creates .venv (or uses $BLAMETRAIL_VENV) and installs the project with its test tools, once per
# change of pyproject.toml. Prints the venv's bin folder.
source "$(dirname "$0")/common.sh"

VENV="${BLAMETRAIL_VENV:-$REPO_DIR/.venv}"
stamp="$VENV/.blametrail-installed"
want=$(cat "$REPO_DIR/pyproject.toml" | md5sum | cut -d' ' -f1)
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV"
  python3 -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
fi
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  log "installing BlameTrail and its test tools into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e "$REPO_DIR[test]" >&2
  echo "$want" > "$stamp"
fi
echo "$VENV/bin"
