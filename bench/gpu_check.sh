#!/usr/bin/env bash
# The GPU path's device check (issue 13). See docs/gpu-check.md.
#
#   bench/gpu_check.sh [--dry-run] [--budget SECONDS]      # results in $OUT/gpu_check.{json,txt}
#
# On the device machine (no registry there) it first installs the wheels carried in .whl/
# (made here by bench/gpu_wheels.sh) into a folder under the interpreter's sys.prefix (the
# sandbox's allow-list shows that prefix, not the rest of /opt), copies src/ beside it,
# points a .pth at both, and unpacks bubblewrap from .whl/ if the image lacks it.
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

PURELIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Install when Loom's dependencies are missing, and again on a machine where an earlier run
# installed them (so PATH and src/ are set up the same way every time).
if compgen -G "$ROOT/.whl/*.whl" >/dev/null && { [ -e "$PURELIB/loom-gpu-check.pth" ] \
    || ! PYTHONPATH="$ROOT/src" "$PY" -c "import ray, fastapi, loom.coordinator.app" 2>/dev/null; }; then
  # The sandbox shows only an allow-list of the host (system dirs and this Python's own
  # prefix, see loom.agent.runtimes.fsview): keep everything under sys.prefix.
  BASE=${LOOM_CHECK_BASE:-}
  if [ -z "$BASE" ]; then
    PREFIX=$("$PY" -c 'import sys; print(sys.prefix)')
    for b in "$PREFIX/loom-gpu-check" /opt/loom-gpu-check; do
      if mkdir -p "$b" 2>/dev/null && [ -w "$b" ]; then BASE=$b; break; fi
    done
    [ "$BASE" = "$PREFIX/loom-gpu-check" ] \
      || echo "warning: $PREFIX is read-only; the sandbox will not see $BASE" >&2
  fi
  SITE=$BASE/site
  echo "installing $(ls "$ROOT"/.whl/*.whl | wc -l) carried wheels into $SITE"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$ROOT"/.whl/*.whl >"$OUT/install.log" 2>&1; then
    echo "warning: installing the carried wheels failed (see install.log); going on" >&2
    tail -5 "$OUT/install.log" >&2
  fi
  rm -rf "$BASE/src" && cp -a "$ROOT/src" "$BASE/src"
  # A .pth in the interpreter's own site-packages: every process of that Python sees Loom
  # and the carried packages, the Ray nodes inside bubblewrap too (a cluster spec may not
  # set PYTHONPATH), and the image's own packages keep precedence.
  if printf '%s\n%s\n' "$BASE/src" "$SITE" >"$PURELIB/loom-gpu-check.pth" 2>/dev/null; then
    export LOOM_CHECK_INSTALL="wheels in $SITE, src in $BASE/src, via $PURELIB/loom-gpu-check.pth"
  else
    echo "warning: $PURELIB is read-only; using PYTHONPATH (Ray inside the sandbox will lack it)" >&2
    export PYTHONPATH="$BASE/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export LOOM_CHECK_INSTALL="wheels in $SITE, src in $BASE/src, via PYTHONPATH"
  fi
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
