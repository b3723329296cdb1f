"""The GPU device check's dry run (bench/gpu_check.sh --dry-run, issue 13), so the script
cannot rot between the rare sessions that have a GPU: every step that can run without one
runs and passes (a real coordinator, real agents, a real Ray cluster in bubblewrap), and
each step or case it skips says why, for a reason this machine actually has."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loom.agent.runtimes.bwrap import probe_bwrap

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]
STEPS = [
    "environment",
    "inventory",
    "prover_profile",
    "classify_local",
    "challenge_own_class",
    "challenge_other_class",
    "cluster_sandbox",
]


def _allowed_skips() -> dict[str, str]:
    """Steps this machine may skip, with a word the reason must contain."""
    allowed: dict[str, str] = {}
    if importlib.util.find_spec("torch") is None:
        allowed["prover_profile"] = "torch"
        allowed["classify_local"] = "torch"
    if probe_bwrap() is not None:
        allowed["cluster_sandbox"] = "bubblewrap"
    return allowed


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, int]:
    out = tmp_path_factory.mktemp("gpu-check-out")
    env = dict(os.environ, OUT=str(out), LOOM_CHECK_PYTHON=sys.executable)
    for name in ("LOOM_HOME", "LOOM_COORDINATOR", "LOOM_KEY"):
        env.pop(name, None)
    done = subprocess.run(
        [str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--budget", "300"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    report_path = out / "gpu_check.json"
    assert report_path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    text = (out / "gpu_check.txt").read_text()
    return json.loads(report_path.read_text()), text, done.returncode


def test_dry_run_report_has_every_step_in_shape(dry_run: tuple[dict[str, Any], str, int]) -> None:
    report, text, code = dry_run
    assert report["schema"] == 1
    assert report["mode"] == "dry-run" and report["mode_reason"] == "--dry-run"
    assert report["finished"] is True
    assert [s["name"] for s in report["steps"]] == STEPS
    for step in report["steps"]:
        assert step["status"] in ("ok", "failed", "skipped"), step
        assert isinstance(step["seconds"], float | int) and isinstance(step["data"], dict)
        assert isinstance(step["summary"], str) and isinstance(step["reason"], str)
        assert f"] {step['name']} (" in text
    counts = report["counts"]
    assert sum(counts.values()) == len(STEPS)
    assert report["installed"]["pydantic"]  # versions as installed, for the device's record
    failed = {
        s["name"]: s["reason"] + s.get("traceback", "")
        for s in report["steps"]
        if s["status"] == "failed"
    }
    assert failed == {} and code == 0, failed


def test_dry_run_skips_only_what_this_machine_cannot_run(
    dry_run: tuple[dict[str, Any], str, int],
) -> None:
    report, _text, _code = dry_run
    allowed = _allowed_skips()
    for step in report["steps"]:
        if step["status"] == "skipped":
            assert step["name"] in allowed, f"{step['name']} skipped: {step['reason']}"
            assert allowed[step["name"]] in step["reason"], step["reason"]
    other = next(s for s in report["steps"] if s["name"] == "challenge_other_class")
    assert [c["case"] for c in other["data"]["skipped_cases"]] == ["gpu_as_l40s"]
    assert "needs a GPU" in other["data"]["skipped_cases"][0]["reason"]


def test_dry_run_figures(dry_run: tuple[dict[str, Any], str, int]) -> None:
    report, _text, _code = dry_run
    steps = {s["name"]: s for s in report["steps"]}
    inv = steps["inventory"]["data"]
    assert inv["report"]["type"] == "inventory"
    assert inv["report"]["inventory"]["cpu_cores"] >= 1
    own = steps["challenge_own_class"]["data"]
    (cpu,) = own["challenges"]
    assert cpu["device_class"] == "cpu" and cpu["outcome"] == "passed"
    assert cpu["best_window_rate"] >= cpu["required_rate"] > 0
    assert cpu["rounds"] == 12 and cpu["openings_failed"] == 0
    assert own["coordinator_cpu_s"] > 0
    (hidden,) = steps["challenge_other_class"]["data"]["cases"]
    assert hidden["case"] == "l40s_gpu_hidden" and hidden["device_class"] == "l40s"
    assert hidden["outcome"] == "failed" and "cannot prove" in hidden["reason"]
    assert hidden["classified_correctly"] and not hidden["evidence"]
    if steps["cluster_sandbox"]["status"] == "ok":
        sandbox = steps["cluster_sandbox"]["data"]
        assert sandbox["cluster"]["state"] == "running"
        assert sandbox["inside"]["in_sandbox"] is True
        assert sandbox["inside"]["matmul"]["ok"] is True
        assert sandbox["unallocated_nvidia_visible"] == []
        assert sandbox["cluster_down_exit"] == 0
    if steps["prover_profile"]["status"] == "ok":
        prof = steps["prover_profile"]["data"]
        assert prof["device"] == "cpu" and prof["rate"] > 0
        assert set(prof["phase_s"]) == {"gen_a", "gen_b", "product", "digest"}
