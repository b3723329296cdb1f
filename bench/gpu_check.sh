#!/usr/bin/env bash
# The GPU path's device check (issue 13). See docs/gpu-check.md.
#
#   bench/gpu_check.sh [--dry-run] [--budget SECONDS]      # results in $OUT/gpu_check.{json,txt}
#
# On the device machine (no registry there) it first installs the wheels carried in .whl/
# (made here by bench/gpu_wheels.sh) into a target folder outside the sandbox's hidden
# paths, copies src/ beside it, and unpacks bubblewrap from .whl/ if the image lacks it.
# Where Loom's dependencies import already (CI, a developer machine: the repo's .venv or
# python3) nothing is installed.
# Without /dev/nvidia* (or with --dry-run) every GPU-only part is skipped, with the reason.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export OUT=${OUT:-$ROOT/test-artifacts/gpu-check}
mkdir -p "$OUT"
PY=${LOOM_CHECK_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=$(command -v python3); fi
fi
BUDGET=420
prev=""
for a in "$@"; do [ "$prev" = "--budget" ] && BUDGET=${a%.*}; prev=$a; done

if compgen -G "$ROOT/.whl/*.whl" >/dev/null \
    && ! PYTHONPATH="$ROOT/src" "$PY" -c "import ray, fastapi, loom.coordinator.app" 2>/dev/null; then
  # /tmp, /home, /root, /run and /mnt are hidden inside the sandbox: stay out of them.
  BASE=${LOOM_CHECK_BASE:-}
  if [ -z "$BASE" ]; then
    for b in /opt/loom-gpu-check /srv/loom-gpu-check /var/lib/loom-gpu-check; do
      if mkdir -p "$b" 2>/dev/null && [ -w "$b" ]; then BASE=$b; break; fi
    done
  fi
  SITE=$BASE/site
  echo "installing $(ls "$ROOT"/.whl/*.whl | wc -l) carried wheels into $SITE"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$ROOT"/.whl/*.whl >"$OUT/install.log" 2>&1; then
    echo "warning: installing the carried wheels failed (see install.log); going on" >&2
    tail -5 "$OUT/install.log" >&2
  fi
  rm -rf "$BASE/src" && cp -a "$ROOT/src" "$BASE/src"
  export PYTHONPATH="$BASE/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export LOOM_CHECK_PYTHONPATH="$BASE/src:$SITE"
  export PATH="$SITE/bin:$PATH"
  if ! command -v bwrap >/dev/null && compgen -G "$ROOT/.whl/bubblewrap_*.deb" >/dev/null; then
    dpkg -x "$(ls "$ROOT"/.whl/bubblewrap_*.deb | head -1)" "$BASE/bwrap" \
      && export PATH="$BASE/bwrap/usr/bin:$PATH" \
      && echo "bubblewrap unpacked into $BASE/bwrap"
  fi
else
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
# The steps keep to --budget; this only stops a hang from eating the whole device lease.
timeout --kill-after=15 $((BUDGET + 90)) "$PY" "$ROOT/bench/gpu_check.py" --out "$OUT" "$@" \
  2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
