# Sourced by run.sh and test.sh: create .venv with python3 (>= 3.10) if it is missing and
# install refnorm into it, editable, with the extras named in REFNORM_EXTRAS. Installs again
# only when pyproject.toml or the extras change. Set PYTHON to use another interpreter.

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
python=${PYTHON:-python3}

if ! command -v "$python" >/dev/null 2>&1; then
  echo "error: $python not found; refnorm needs Python >= 3.10 (set PYTHON=/path/to/python3)" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "error: refnorm needs Python >= 3.10; $python is $("$python" --version 2>&1)" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "setting up $venv ..." >&2
  if ! "$python" -m venv "$venv"; then
    echo "error: '$python -m venv' failed; install Python's venv module" \
         "(Debian/Ubuntu: apt-get install python3-venv) and run again" >&2
    rm -rf "$venv"
    exit 1
  fi
fi

spec="$root${REFNORM_EXTRAS:+[$REFNORM_EXTRAS]}"
want="$(cksum < "$root/pyproject.toml") $spec"
stamp="$venv/.refnorm-install"
# Without extras, any install of this pyproject.toml will do; with extras, the same extras.
if [ -n "${REFNORM_EXTRAS:-}" ]; then match=(-qxF "$want"); else match=(-qF "$want"); fi
if [ ! -f "$stamp" ] || ! grep "${match[@]}" "$stamp"; then
  echo "installing refnorm${REFNORM_EXTRAS:+ with extras $REFNORM_EXTRAS} into $venv ..." >&2
  log="$venv/.refnorm-install.log"
  if ! { "$venv/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
         "$venv/bin/python" -m pip install --disable-pip-version-check -e "$spec"; } >"$log" 2>&1
  then
    tail -n 40 "$log" >&2
    echo "error: installing refnorm into $venv failed (full log: $log)" >&2
    exit 1
  fi
  echo "$want" >> "$stamp"
fi
export PATH="$venv/bin:$PATH"
