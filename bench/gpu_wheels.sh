#!/usr/bin/env bash
# Download, here, exactly the wheels the device machine (nvidia-h200: Python 3.12, x86_64,
# no registry) lacks to run bench/gpu_check.sh, into .whl/ at the repo root (git-ignored).
#
#   bench/gpu_wheels.sh            # needs network here; about 60 MiB
#
# What is missing = the runtime dependency closure of `loom` in this .venv (same pinned
# versions), minus the packages the device image already has (IMAGE_HAS below, from the
# device notes' package list of 2026-11-17), minus what the check never imports there
# (asyncpg: SQLite only; virtualenv, py-spy: Ray runtime envs / profiling only).
# Ray's wheel (79 MB) is repacked without its Java jar, its dashboard source maps and the
# libraries Loom does not use (rllib, tune, train, serve, data, llm), so the whole travels
# under the 64 MiB limit. bubblewrap's .deb travels too, in case the image lacks bwrap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.whl}
LIMIT_MB=${LIMIT_MB:-60}
mkdir -p "$DEST"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

PINS=$("$PY" - <<'PYEOF'
import importlib.metadata as md
import re
import tomllib

from packaging.requirements import Requirement

IMAGE_HAS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cycler cython filelock flatbuffers fonttools frozenlist fsspec grpcio h11 h5py
httpcore httpx humanize hypothesis idna iniconfig jinja2 joblib markdown markdown-it-py
markupsafe mdurl msgpack multidict networkx ninja numpy nvidia-ml-py packaging pandas
pathspec pillow pip pluggy prometheus-client propcache protobuf psutil pygments pyparsing
pytest python-dateutil pyyaml regex requests rich scipy setuptools shellingham six
sortedcontainers sympy tabulate torch tqdm triton typer typing-extensions typing-inspect
urllib3 uvloop werkzeug wheel wrapt xxhash yarl zipp
""".split())
NEVER_IMPORTED = {"asyncpg", "virtualenv", "distlib", "platformdirs", "python-discovery",
                  "py-spy"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# Loom's own requirements from pyproject.toml (the installed metadata of an editable
# install lags behind a dependency added since), the rest from the installed packages.
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
seen: dict[str, tuple[str, frozenset[str]]] = {}
todo: list[tuple[str, frozenset[str]]] = []
for text in project["dependencies"]:
    req = Requirement(text)
    todo.append((req.name, frozenset(req.extras)))
while todo:
    name, extras = todo.pop()
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        raise SystemExit(f"{name} is a dependency but not installed here: make venv first")
    key = norm(dist.metadata["Name"])
    prev = seen.get(key)
    if prev is not None and extras <= prev[1]:
        continue
    seen[key] = (dist.version, (prev[1] if prev else frozenset()) | extras)
    for text in dist.requires or []:
        req = Requirement(text)
        envs = [{"extra": e} for e in (extras or {""})]
        if req.marker is not None and not any(req.marker.evaluate(e) for e in envs):
            continue
        todo.append((req.name, frozenset(req.extras)))
for key, (version, _) in sorted(seen.items()):
    if key != "loom" and key not in IMAGE_HAS and key not in NEVER_IMPORTED:
        print(f"{key}=={version}")
PYEOF
)
echo "missing on the device image:" $PINS
rm -f "$DEST"/*.whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64)
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" \
  --platform any -d "$DEST" $PINS

# Slim Ray: same version, same binaries, without what `ray start` and a task never load.
"$PY" - "$DEST" <<'PYEOF'
import base64
import hashlib
import sys
import zipfile
from pathlib import Path

DROP = ("ray/jars/", "ray/rllib/", "ray/tune/", "ray/train/", "ray/serve/", "ray/data/",
        "ray/llm/", "ray/air/examples/")
dest = Path(sys.argv[1])
for whl in dest.glob("ray-*.whl"):
    out = whl.with_suffix(".slim")
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        kept = []
        for info in src.infolist():
            name = info.filename
            if name == record_name or name.startswith(DROP) or name.endswith(".js.map"):
                continue
            data = src.read(info)
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            kept.append(f"{name},sha256={digest.decode()},{len(data)}")
        kept.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(kept) + "\n")
    out.replace(whl)
    print(f"slimmed {whl.name}: {whl.stat().st_size / 2**20:.1f} MiB")
PYEOF

# bubblewrap for the sandbox step (unpacked there with dpkg -x, only if bwrap is missing).
if command -v apt-get >/dev/null; then
  (cd "$DEST" && rm -f bubblewrap_*.deb && apt-get download -qq bubblewrap 2>/dev/null) \
    || echo "note: could not download bubblewrap's .deb; the sandbox step needs bwrap there"
fi
total=$(du -sm "$DEST" | cut -f1)
ls -la "$DEST"
echo "total ${total} MiB in $DEST (the repo itself adds ~2 MiB; the limit is 64 MiB)"
if [ "$total" -gt "$LIMIT_MB" ]; then
  echo "error: $DEST is over ${LIMIT_MB} MiB: it would not travel" >&2
  exit 1
fi
