"""The GPU path's device check (issue 13): one run on a machine with an NVIDIA GPU, or a
dry run of every step that can run without one. Start it through ``bench/gpu_check.sh``
(which installs carried wheels first); see docs/gpu-check.md.

    bench/gpu_check.sh [--dry-run] [--budget 450]

Steps, each isolated (a failing step is recorded and the next one runs):

1. ``environment``: Python, package versions, /dev/nvidia*, nvidia-smi, bubblewrap;
2. ``inventory``: the NVML inventory through ``loom.agent.inventory``, as the agent
   reports it;
3. ``prover_profile``: one prover round phase by phase (generation, INT8 product,
   digest) at the GPU class's shapes (CPU: the ``cpu`` class), and the verifier's CPU cost
   per opening;
4. ``classify_local``: the torch prover against the verifier in process: an honest claim
   passes, a far faster claim fails on timing only;
5. ``challenge_own_class``: a real coordinator and agent on loopback; the agent's CPU and
   GPU are challenged (the GPU as its own class): rounds, best-window rate, wall time,
   verifier CPU, pass/fail;
6. ``challenge_other_class``: the GPU declared as an L40S, and an L40S claim with the GPU
   hidden (``CUDA_VISIBLE_DEVICES=""``); each must be classified as expected;
7. ``cluster_sandbox``: ``loom cluster up`` (1 node, ``gpu: <class>:1``, or 1 CPU) in the
   bubblewrap sandbox and a Ray task inside it that multiplies on the GPU with torch and
   lists the /dev/nvidia* it sees.

Everything goes to ``$OUT/gpu_check.json`` and ``$OUT/gpu_check.txt``, rewritten after
every step, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

if TYPE_CHECKING:
    from gpu_check_steps import Ctx

SCHEMA_VERSION = 1
STEPS: list[tuple[str, str, float]] = [
    # name, what it shows, seconds to keep for it in GPU mode (the reserve of earlier steps)
    ("environment", "Python, packages, devices, bubblewrap", 0),
    ("inventory", "NVML inventory as the agent reports it", 0),
    ("prover_profile", "one prover round, phase by phase", 10),
    ("classify_local", "torch prover vs verifier in process: honest pass, overclaim fails", 5),
    ("challenge_own_class", "coordinator + agent: CPU and GPU challenged as their class", 130),
    ("challenge_other_class", "GPU declared as L40S; L40S claim with the GPU hidden", 100),
    ("cluster_sandbox", "loom cluster up in bwrap; Ray task on the GPU inside", 90),
]


def _reserve_after(name: str, gpu: bool) -> float:
    names = [s[0] for s in STEPS]
    later = STEPS[names.index(name) + 1 :]
    return sum(s[2] for s in later) * (1.0 if gpu else 0.3)


def _run_step(ctx: Ctx, name: str) -> dict[str, Any]:
    from gpu_check_sandbox import step_cluster_sandbox
    from gpu_check_steps import (
        CheckFailed,
        Skip,
        step_challenge_other_class,
        step_challenge_own_class,
        step_classify_local,
        step_environment,
        step_inventory,
        step_prover_profile,
    )

    funcs: dict[str, Callable[[Ctx], str]] = {
        "environment": step_environment,
        "inventory": step_inventory,
        "prover_profile": step_prover_profile,
        "classify_local": step_classify_local,
        "challenge_own_class": lambda c: step_challenge_own_class(c, _reserve_after(name, c.gpu)),
        "challenge_other_class": lambda c: step_challenge_other_class(
            c, _reserve_after(name, c.gpu)
        ),
        "cluster_sandbox": lambda c: step_cluster_sandbox(c, _reserve_after(name, c.gpu)),
    }
    ctx.data = {}
    t0 = time.monotonic()
    record: dict[str, Any] = {"name": name, "status": "ok", "summary": "", "reason": ""}
    print(f"--- {name} ({ctx.left():.0f} s of budget left)", flush=True)
    try:
        if ctx.left() < 10:
            raise Skip(f"time budget exhausted ({ctx.left():.0f} s left)")
        record["summary"] = funcs[name](ctx)
    except Skip as exc:
        record.update(status="skipped", reason=str(exc))
    except CheckFailed as exc:
        record.update(status="failed", reason=str(exc))
    except Exception as exc:
        record.update(
            status="failed",
            reason=f"{type(exc).__name__}: {exc}"[:2000],
            traceback=traceback.format_exc()[-4000:],
        )
    record["seconds"] = round(time.monotonic() - t0, 2)
    record["data"] = ctx.data
    print(f"[{record['status']}] {name}: {record['summary'] or record['reason']}", flush=True)
    return record


def _write(out: Path, report: dict[str, Any]) -> None:
    counts = {s: 0 for s in ("ok", "failed", "skipped")}
    for step in report["steps"]:
        counts[step["status"]] += 1
    report["counts"] = counts
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(out / "gpu_check.json")
    lines = [
        f"Loom GPU check, {report['mode']} ({report['mode_reason']}), {report['started_at']}",
        f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped"
        + ("" if report.get("finished") else " (still running or cut short)"),
    ]
    for step in report["steps"]:
        text = step["summary"] if step["status"] == "ok" else step["reason"]
        lines.append(f"[{step['status']:>7}] {step['name']} ({step['seconds']:.1f} s): {text}")
    (out / "gpu_check.txt").write_text("\n".join(lines) + "\n")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out or os.environ.get("OUT") or HERE.parent / "test-artifacts" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*"))
    gpu = bool(nodes) and not args.dry_run
    if args.dry_run:
        reason = "--dry-run"
    elif not nodes:
        reason = "no /dev/nvidia* on this machine: dry run"
    else:
        reason = f"GPU device nodes {nodes}"
    work = Path(args.work or tempfile.mkdtemp(prefix="lgc-"))
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "mode": "gpu" if gpu else "dry-run",
        "mode_reason": reason,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "budget_s": args.budget,
        "work_dir": str(work),
        "installed": installed_versions(),
        "steps": [],
    }
    try:
        from gpu_check_steps import Ctx
    except Exception as exc:  # Loom or a dependency does not import: say which, and stop
        report["steps"].append(_import_failure(exc))
        report["finished"] = True
        _write(out, report)
        print((out / "gpu_check.txt").read_text(), end="", flush=True)
        return 1
    ctx = Ctx(
        out=out,
        work=work,
        gpu=gpu,
        deadline=time.monotonic() + args.budget,
        python=sys.executable,
        script=Path(__file__).resolve(),
    )
    wanted = set(args.only.split(",")) if args.only else None
    try:
        for name, _what, _reserve in STEPS:
            if wanted is not None and name not in wanted:
                continue
            report["steps"].append(_run_step(ctx, name))
            _write(out, report)
    finally:
        for net in ctx.networks:
            try:
                net.stop()
            except Exception as exc:  # keep the report even if a teardown fails
                print(f"teardown of {net.root}: {exc}", file=sys.stderr)
        report["finished"] = True
        report["total_s"] = round(args.budget - ctx.left(), 1)
        _write(out, report)
    print((out / "gpu_check.txt").read_text(), end="", flush=True)
    return 0 if all(s["status"] != "failed" for s in report["steps"]) else 1


def installed_versions() -> dict[str, str | None]:
    """Versions of Loom's dependencies as installed (read from metadata, not imported)."""
    import importlib.metadata as md

    names = [
        "numpy",
        "pydantic",
        "pydantic-core",
        "typing-extensions",
        "fastapi",
        "starlette",
        "uvicorn",
        "sqlalchemy",
        "aiosqlite",
        "alembic",
        "websockets",
        "httpx",
        "cryptography",
        "cffi",
        "typer",
        "click",
        "rich",
        "pyyaml",
        "nvidia-ml-py",
        "ray",
        "protobuf",
        "grpcio",
        "aiohttp",
        "jsonschema",
        "torch",
    ]
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _import_failure(exc: Exception) -> dict[str, Any]:
    return {
        "name": "environment",
        "status": "failed",
        "summary": "",
        "reason": f"Loom does not import here: {type(exc).__name__}: {exc}"[:2000],
        "traceback": traceback.format_exc()[-4000:],
        "seconds": 0.0,
        "data": {"python": sys.version, "sys_path": sys.path, "installed": installed_versions()},
    }


# ------------------------------------------------------------------ helper commands


def serve_coordinator(args: argparse.Namespace) -> int:
    """``loom coordinator serve`` with the two settings the check needs (module docstring
    of gpu_check_net)."""
    import logging

    import uvicorn

    from loom.coordinator.app import create_app
    from loom.coordinator.config import Settings
    from loom.protocol.messages import MAX_FRAME_BYTES

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(
        db_url=args.db,
        port=args.port,
        faucet=True,
        restart_grace_s=0.0,
        heartbeat_timeout_s=30.0,
        require_verified=args.require_verified,
        extra={"challenge.failed_retry_s": "3600"},
    )
    uvicorn.run(
        create_app(settings),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        ws_max_size=MAX_FRAME_BYTES,
        ws_per_message_deflate=False,
        access_log=False,
    )
    return 0


def sandbox_probe(want_gpu: bool) -> dict[str, Any]:
    """Runs as a Ray task inside the member's sandbox: what it sees, and a product."""
    import os
    import socket
    import time

    seen: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "uid": os.getuid(),
        "in_sandbox": "LOOM_SANDBOX" in os.environ,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "dev_nvidia": sorted(p for p in os.listdir("/dev") if p.startswith("nvidia")),
        "dev_entries": sorted(os.listdir("/dev")),
    }
    try:
        import torch
    except ImportError as exc:
        seen["torch"] = None
        seen["cuda_available"] = False
        seen["cuda_error"] = f"torch not importable: {exc}"
        import numpy as np

        a = np.random.default_rng(0).standard_normal((512, 512))
        t0 = time.perf_counter()
        c = a @ a.T
        secs = time.perf_counter() - t0
        ok = bool(np.allclose(c, c.T)) and bool(np.all(np.diag(c) > 0))
        seen["matmul"] = {"what": "numpy f64 512", "ok": ok, "tflops": 2 * 512**3 / secs / 1e12}
        return seen
    seen["torch"] = str(torch.__version__)
    try:
        seen["cuda_available"] = bool(torch.cuda.is_available())
    except Exception as exc:
        seen["cuda_available"] = False
        seen["cuda_error"] = str(exc)
    if want_gpu and seen["cuda_available"]:
        dev = torch.device("cuda:0")
        seen["device_count"] = int(torch.cuda.device_count())
        seen["device_name"] = str(torch.cuda.get_device_name(0))
        n = 8192
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        c = a @ b
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(10):
            c = a @ b
        torch.cuda.synchronize(dev)
        secs = (time.perf_counter() - t0) / 10
        ref = a[:64].float() @ b.float()
        err = float((c[:64].float() - ref).abs().max() / ref.abs().max())
        seen["matmul"] = {
            "what": f"torch bf16 {n}",
            "seconds": secs,
            "tflops": 2 * n**3 / secs / 1e12,
            "rel_err": err,
            "ok": err < 2e-2,
        }
        return seen
    if want_gpu:
        seen.setdefault("cuda_error", "torch.cuda.is_available() is False")
    x = torch.randn(512, 512, dtype=torch.float64)
    y = x @ x.T
    seen["matmul"] = {
        "what": "torch f64 512 on CPU",
        "ok": bool(torch.allclose(y, y.T)),
        "tflops": 0.0,
    }
    return seen


def ray_task(args: argparse.Namespace) -> int:
    import logging

    import ray

    ray.init(address=args.address, logging_level=logging.WARNING, log_to_driver=False)
    remote = ray.remote(sandbox_probe).options(num_cpus=1, num_gpus=1 if args.gpu else 0)
    seen = ray.get(remote.remote(args.gpu), timeout=120)
    print(json.dumps(seen, default=str), flush=True)
    ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--dry-run", action="store_true", help="skip every GPU-only part")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all steps")
    parser.add_argument("--out", help="output folder (default $OUT)")
    parser.add_argument("--work", help="work folder for homes and logs (default: a temp dir)")
    parser.add_argument("--only", help="comma-separated step names (for debugging)")
    coord = sub.add_parser("coordinator", help="internal: the check's coordinator process")
    coord.add_argument("--port", type=int, required=True)
    coord.add_argument("--db", required=True)
    coord.add_argument("--require-verified", action=argparse.BooleanOptionalAction, default=True)
    task = sub.add_parser("ray-task", help="internal: the Ray driver of cluster_sandbox")
    task.add_argument("--address", required=True)
    task.add_argument("--gpu", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "coordinator":
        return serve_coordinator(args)
    if args.command == "ray-task":
        return ray_task(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
