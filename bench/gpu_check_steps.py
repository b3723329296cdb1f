"""The steps of bench/gpu_check.py. Each step takes the shared :class:`Ctx`, fills its
``data`` and returns a one-line summary; it raises :class:`Skip` (with the reason) when
it cannot run here, or :class:`CheckFailed` when something it checks does not hold.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gpu_check_net import Network, challenge_record
from loom.agent.inventory import collect, default_probe
from loom.agent.prover import Prover, TorchProver, cuda_available, torch_available
from loom.agent.prover.torch_prover import digests_torch, gen_int8_torch
from loom.agent.runtimes.bwrap import probe_bwrap
from loom.core.challenge import (
    ChallengeParams,
    ChallengeResult,
    VerifierSession,
    format_rate,
    params_for,
    tile_digest,
)
from loom.core.challenge.generator import MAT_A, MAT_B
from loom.core.challenge.opening import recompute_tile
from loom.protocol.messages import InventoryUpdate

#: The class a GPU is declared as in the "other class" case (H200 → L40S).
OTHER_CLASS = "l40s"


class Skip(Exception):
    """The step cannot run here; the message says why."""


class CheckFailed(Exception):
    """The step ran and something it checks does not hold."""


@dataclass
class Ctx:
    out: Path
    work: Path
    gpu: bool
    deadline: float
    python: str
    script: Path
    data: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    networks: list[Network] = field(default_factory=list)
    net: Network | None = None

    def left(self, reserve: float = 0.0) -> float:
        return self.deadline - time.monotonic() - reserve

    def timeout(self, wanted: float, reserve: float) -> float:
        """``wanted`` seconds, cut to what the overall budget leaves after ``reserve``."""
        have = self.left(reserve)
        if have < 5:
            raise CheckFailed(f"time budget exhausted ({self.left():.0f} s left)")
        return min(wanted, have)

    def runtime(self) -> str:
        return "bwrap" if self.facts.get("bwrap_reason") is None else "process"

    def network(self, *, require_verified: bool = True, name: str = "net") -> Network:
        net = Network(self.work / name, self.python, self.script, require_verified=require_verified)
        self.networks.append(net)
        net.start()
        return net


def version_of(name: str) -> str | None:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # a broken install is a finding, not a crash
        return f"not importable: {type(exc).__name__}: {exc}"[:200]
    return str(getattr(mod, "__version__", "?"))


def nvidia_nodes() -> list[str]:
    return sorted(glob.glob("/dev/nvidia*"))


# ----------------------------------------------------------------------------- steps


def step_environment(ctx: Ctx) -> str:
    d = ctx.data
    d["python"] = sys.version.split()[0]
    d["executable"] = sys.executable
    d["platform"] = platform.platform()
    d["cpu_count"] = os.cpu_count()
    d["uid"] = os.geteuid()
    loom = importlib.import_module("loom")
    d["loom_path"] = str(Path(str(loom.__file__)).parent)
    d["packages"] = {
        n: version_of(n)
        for n in (
            "numpy", "pydantic", "fastapi", "uvicorn", "sqlalchemy", "websockets",
            "cryptography", "ray", "torch", "pynvml", "typer", "httpx",
        )
    }  # fmt: skip
    d["dev_nvidia"] = nvidia_nodes()
    d["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    d["ld_library_path"] = os.environ.get("LD_LIBRARY_PATH")
    d["libcuda_in_ld_cache"] = _libcuda_in_ld_cache()
    try:  # which limits a member gets (cgroup v2 memory.max, or RLIMIT_AS: hard on CUDA)
        d["cgroup_v2_controllers"] = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    except OSError:
        d["cgroup_v2_controllers"] = None
    d["check_install"] = os.environ.get("LOOM_CHECK_INSTALL", "none (dependencies already here)")
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
            d["nvidia_smi"] = (done.stdout or done.stderr).strip()[:1000]
        except (OSError, subprocess.TimeoutExpired) as exc:
            d["nvidia_smi"] = f"failed: {exc}"
    reason = probe_bwrap()
    ctx.facts["bwrap_reason"] = reason
    d["bwrap"] = shutil.which("bwrap")
    d["bwrap_usable"] = reason is None
    if reason is not None:
        d["bwrap_reason"] = reason
    d["torch_available"] = torch_available()
    d["cuda_available"] = cuda_available()
    if d["cuda_available"]:
        torch = importlib.import_module("torch")
        d["torch_cuda"] = str(torch.version.cuda)
        d["torch_device"] = str(torch.cuda.get_device_name(0))
    return (
        f"python {d['python']}, torch {d['packages']['torch']}, ray {d['packages']['ray']}, "
        f"bwrap {'ok' if reason is None else 'unusable'}, /dev/nvidia*: {len(d['dev_nvidia'])}"
    )


def step_inventory(ctx: Ctx) -> str:
    probe = default_probe()
    inv = collect(probe, ctx.work / "inventory", runtimes=[ctx.runtime()])
    report = InventoryUpdate(inventory=inv)
    print(report.model_dump_json(indent=2), flush=True)
    ctx.data["probe"] = type(probe).__name__
    ctx.data["report"] = report.model_dump(mode="json")
    gpus = inv.gpus
    ctx.facts["gpus"] = [g.model_dump(mode="json") for g in gpus]
    if gpus:
        ctx.facts["gpu_class"] = gpus[0].model
        ctx.facts["gpu_name"] = gpus[0].name
        ctx.data["gpu_class_known"] = {g.model: _has_class(g.model) for g in gpus}
    if ctx.gpu and not gpus:
        raise CheckFailed(f"{type(probe).__name__} reported no GPU although /dev/nvidia* exist")
    listed = ", ".join(
        f"gpu{g.index} {g.model} ({g.name}, {g.vram_mb} MiB, driver {g.driver}, cc "
        f"{g.compute_capability})"
        for g in gpus
    )
    return f"{type(probe).__name__}: {inv.cpu_cores} cores; " + (listed or "no GPU")


def _libcuda_in_ld_cache() -> list[str]:
    """libcuda entries of the dynamic loader's cache: what a sandboxed process finds without
    LD_LIBRARY_PATH (which a cluster spec may not set)."""
    try:
        done = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [ln.strip() for ln in done.stdout.splitlines() if "libcuda.so" in ln][:8]


def _has_class(model: str) -> bool:
    try:
        params_for(model)
    except KeyError:
        return False
    return True


def _torch_device(ctx: Ctx) -> tuple[Any, str]:
    if not torch_available():
        raise Skip("torch is not importable here (pip install torch to run it on CPU)")
    torch = importlib.import_module("torch")
    if ctx.gpu:
        if not cuda_available():
            raise CheckFailed("torch is installed but sees no CUDA device")
        return torch, "cuda:0"
    return torch, "cpu"


def _gpu_params(ctx: Ctx) -> ChallengeParams:
    cls = ctx.facts.get("gpu_class")
    if cls is None:
        raise CheckFailed("no GPU class from the inventory step")
    try:
        return params_for(str(cls))
    except KeyError as exc:
        raise CheckFailed(str(exc)) from None


def step_prover_profile(ctx: Ctx) -> str:
    """One round of the prover, phase by phase (generation, INT8 product, digest)."""
    torch, device = _torch_device(ctx)
    p = _gpu_params(ctx) if ctx.gpu else params_for("cpu")
    dev = torch.device(device)
    use_int_mm = dev.type == "cuda" and hasattr(torch, "_int_mm")

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    phases: dict[str, list[float]] = {"gen_a": [], "gen_b": [], "product": [], "digest": []}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for r in range(3):  # round 0 is a warm-up, like the challenge's
        rseed = os.urandom(32)
        t0 = time.perf_counter()
        a = gen_int8_torch(rseed, MAT_A, 0, p.m, p.k, dev)
        sync()
        t1 = time.perf_counter()
        bt = gen_int8_torch(rseed, MAT_B, 0, p.n, p.k, dev)
        sync()
        t2 = time.perf_counter()
        if use_int_mm:
            c = torch._int_mm(a, bt.t())
        else:
            c = (a.to(torch.float64) @ bt.to(torch.float64).t()).to(torch.int32)
        sync()
        t3 = time.perf_counter()
        del a, bt
        digests_torch(c, r, p.tile)
        sync()
        t4 = time.perf_counter()
        del c
        if r == 0:
            continue
        for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            phases[key].append(dt)
    med = {k: statistics.median(v) for k, v in phases.items()}
    round_s = sum(med.values())
    rate = p.ops_per_round / round_s
    d = ctx.data
    d["device"] = device
    d["device_class"] = p.device_class
    d["shape"] = {"m": p.m, "n": p.n, "k": p.k, "tile": p.tile, "rounds": p.rounds}
    d["int_mm"] = use_int_mm
    d["phase_s"] = {k: round(v, 6) for k, v in med.items()}
    d["round_s"] = round(round_s, 6)
    d["rate"] = rate
    d["product_only_rate"] = p.ops_per_round / med["product"]
    d["reference_rate"] = p.reference_rate
    d["required_rate"] = p.required_rate
    d["meets_required_rate"] = rate >= p.required_rate
    d["est_prover_wall_s"] = round(round_s * p.rounds, 2)
    d["hard_timeout_s"] = round(p.hard_timeout_s, 1)
    d["est_times_out"] = round_s * p.rounds > p.hard_timeout_s
    if dev.type == "cuda":
        d["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        torch.cuda.empty_cache()
    d["verifier_cpu_per_opening_s"] = _opening_cost(p)
    return (
        f"{p.device_class} on {device}: round {round_s * 1e3:.1f} ms "
        f"(gen {(med['gen_a'] + med['gen_b']) * 1e3:.1f}, product {med['product'] * 1e3:.1f}, "
        f"digest {med['digest'] * 1e3:.1f} ms) = {format_rate(rate)}; product alone "
        f"{format_rate(d['product_only_rate'])}; required {format_rate(p.required_rate)}; "
        f"verifier {d['verifier_cpu_per_opening_s'] * 1e3:.1f} ms CPU per opening"
    )


def _opening_cost(p: ChallengeParams, reps: int = 2) -> float:
    """CPU seconds to regenerate and digest one tile at these shapes (median)."""
    times = []
    for r in range(reps):
        seed = os.urandom(32)
        c0 = time.process_time()
        tile_digest(recompute_tile(p, seed, r, r + 1), r, r, r + 1)
        times.append(time.process_time() - c0)
    return round(statistics.median(times), 6)


def run_local_challenge(params: ChallengeParams, make: Callable[..., Prover]) -> ChallengeResult:
    """A whole challenge in this process: VerifierSession against a prover, timed here."""
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    session = VerifierSession(params, "gpu-check:local", pub)
    start = session.start(now=time.monotonic())
    prover = make(start.spec, key.sign)
    prover.add_start(start)
    while not prover.done:
        commit = prover.prove_next()
        if commit is None:
            raise CheckFailed(
                f"the prover waits for a nonce the verifier did not release ({params})"
            )
        release = session.on_commit(commit, time.monotonic())
        if session.result is not None:
            return session.result
        if release is not None:
            prover.add_nonce(release)
    request = session.draw_openings()
    return session.verify_openings(prover.answer(request))


def step_classify_local(ctx: Ctx) -> str:
    """The torch prover against the verifier, in process: an honest claim of its class
    passes, and a claim of a far faster device fails on timing only (no evidence)."""
    _torch, device = _torch_device(ctx)
    honest = params_for("cpu")
    overclaim = honest.replace(device_class="overclaim", reference_rate=1.0e18)

    def make(spec: Any, sign: Any) -> Prover:
        return TorchProver(spec, sign, device=device)

    cases: list[dict[str, Any]] = []
    for params, expect_pass in ((honest, True), (overclaim, False)):
        t0 = time.perf_counter()
        result = run_local_challenge(params, make)
        ok = result.passed == expect_pass and result.openings_failed == 0 and not result.evidence
        if not expect_pass:
            ok = ok and not result.timing_passed
        cases.append(
            {
                "claimed_class": params.device_class,
                "expected": "passed" if expect_pass else "failed on timing",
                "passed": result.passed,
                "timing_passed": result.timing_passed,
                "rate": result.measured_rate,
                "required_rate": result.required_rate,
                "openings_checked": result.openings_checked,
                "openings_failed": result.openings_failed,
                "evidence": len(result.evidence),
                "reason": result.reason,
                "wall_s": round(time.perf_counter() - t0, 3),
                "classified_correctly": ok,
            }
        )
    ctx.data["device"] = device
    ctx.data["cases"] = cases
    bad = [c for c in cases if not c["classified_correctly"]]
    if bad:
        raise CheckFailed(f"misclassified: {json.dumps(bad)[:600]}")
    return f"torch on {device}: honest cpu claim passed at {format_rate(cases[0]['rate'])}; " + (
        "a 10^18 ops/s claim failed on timing with every opening correct"
    )


# ----------------------------------------------------------------- network challenges


def shared_network(ctx: Ctx) -> Network:
    if ctx.net is None or ctx.net.coordinator is None or ctx.net.coordinator.poll() is not None:
        ctx.net = ctx.network(name=f"net{len(ctx.networks) + 1}")
    return ctx.net


def _challenge_budget(params: list[ChallengeParams]) -> float:
    """Hard timeouts plus openings and set-up, one challenge after the other."""
    return sum(p.hard_timeout_s + 40.0 for p in params) + 30.0


def step_challenge_own_class(ctx: Ctx, reserve: float) -> str:
    """A real coordinator and agent: the agent's CPU, and (GPU mode) its GPU as its class."""
    net = shared_network(ctx)
    cpu0 = net.coordinator_cpu_s() or 0.0
    agent = net.add_agent("check-nvml", runtime=ctx.runtime())
    node = net.wait_node(agent, ctx.timeout(60, reserve))
    ctx.facts["nvml_node"] = node.id
    ctx.data["node"] = {"id": node.id, "devices": [d.model_dump(mode="json") for d in node.devices]}
    targets = [d for d in node.devices if d.kind == "cpu"]
    classes = [params_for("cpu")]
    if ctx.gpu:
        gpus = [d for d in node.devices if d.kind == "gpu"]
        if not gpus:
            raise CheckFailed("the agent registered no GPU (NVML inventory)")
        targets.append(gpus[0])
        classes.append(_gpu_params(ctx))
    ids = [d.id for d in targets]
    found = net.wait_challenges(
        agent, node.id, ids, ctx.timeout(_challenge_budget(classes), reserve)
    )
    ctx.data["agent_cpu_s"] = agent.cpu_s()
    cpu1 = net.coordinator_cpu_s() or 0.0
    ctx.data["coordinator_cpu_s"] = round(cpu1 - cpu0, 3)
    records = []
    for dev, p in zip(targets, classes, strict=True):
        rec = challenge_record(found[dev.id], p.ops_per_round)
        est = rec["prover_round_s_est"]
        rec.update(
            prover_wall_s_est=round(est * p.rounds, 2) if est else None,
            rounds=p.rounds,
            window=p.window,
            ops_per_round=p.ops_per_round,
            hard_timeout_s=round(p.hard_timeout_s, 1),
            expected="passed",
        )
        records.append(rec)
    ctx.data["challenges"] = records
    gpu_rec = records[1] if ctx.gpu else None
    ctx.facts["own_gpu_verified"] = bool(gpu_rec and gpu_rec["passed"])
    if ctx.gpu and gpu_rec is not None:
        ctx.facts["own_gpu_rate"] = gpu_rec["best_window_rate"]
    text = "; ".join(
        f"{r['device_class']}: {r['outcome']} at {format_rate(r['best_window_rate'])} "
        f"(needs {format_rate(r['required_rate'])}, {r['rounds']} rounds, prover ≈ "
        f"{r['prover_wall_s_est']} s, challenge {r['challenge_wall_s']:.1f} s)"
        for r in records
    )
    text += f"; coordinator CPU {ctx.data['coordinator_cpu_s']:.2f} s"
    failed = [r for r in records if not r["passed"]]
    if failed:
        raise CheckFailed(
            "an honest device failed its own class: "
            + "; ".join(f"{r['device_id']} ({r['device_class']}): {r['reason']}" for r in failed)
            + f" | {text}"
        )
    return text


def step_challenge_other_class(ctx: Ctx, reserve: float) -> str:
    """The GPU declared as another class, and that claim with the GPU hidden."""
    net = shared_network(ctx)
    inventory = f"- kind: gpu\n  model: {OTHER_CLASS}\n  vram_gb: 48\n"
    other = params_for(OTHER_CLASS)
    cases: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    started = []
    if ctx.gpu:
        own = _gpu_params(ctx)
        expect = "passed" if own.reference_rate >= other.reference_rate else "failed"
        agent = net.add_agent("check-as-other", runtime=ctx.runtime(), inventory=inventory)
        started.append((agent, "gpu_as_" + OTHER_CLASS, expect, other))
    else:
        skipped.append({"case": "gpu_as_" + OTHER_CLASS, "reason": "needs a GPU"})
    hidden = net.add_agent(
        "check-hidden", runtime=ctx.runtime(), inventory=inventory, env={"CUDA_VISIBLE_DEVICES": ""}
    )
    started.append((hidden, OTHER_CLASS + "_gpu_hidden", "failed: cannot prove", other))
    budget = _challenge_budget([params_for("cpu")] * len(started) + [c[3] for c in started])
    deadline = time.monotonic() + ctx.timeout(budget, reserve)
    try:
        for agent, case, expect, p in started:
            node = net.wait_node(agent, max(5.0, deadline - time.monotonic()))
            gpus = [d for d in node.devices if d.kind == "gpu"]
            if not gpus:
                raise CheckFailed(f"{case}: the declared GPU was not registered")
            # Wait for the node's CPU too: an agent stopped in the middle of a challenge
            # is not what this step measures.
            cpus = [d.id for d in node.devices if d.kind == "cpu"]
            found = net.wait_challenges(
                agent, node.id, [gpus[0].id, *cpus], max(5.0, deadline - time.monotonic())
            )
            rec = challenge_record(found[gpus[0].id], p.ops_per_round)
            if expect.startswith("failed: "):
                ok = not rec["passed"] and "cannot prove" in rec["reason"] and not rec["evidence"]
            else:
                ok = rec["passed"] == (expect == "passed") and not rec["evidence"]
            rec.update(case=case, expected=expect, classified_correctly=ok, rounds=p.rounds)
            own_rate = ctx.facts.get("own_gpu_rate")
            if ctx.gpu and rec["best_window_rate"] and own_rate:
                rec["rate_vs_own_class_run"] = round(rec["best_window_rate"] / own_rate, 3)
            cases.append(rec)
    finally:
        for agent, *_ in started:
            agent.stop()
    ctx.data["cases"] = cases
    ctx.data["skipped_cases"] = skipped
    text = "; ".join(
        f"{c['case']}: {c['outcome']} ({'as expected' if c['classified_correctly'] else 'WRONG'}"
        f", expected {c['expected']}) at {format_rate(c['best_window_rate'])}"
        for c in cases
    )
    if skipped:
        text += "; skipped " + ", ".join(f"{s['case']} ({s['reason']})" for s in skipped)
    bad = [c for c in cases if not c["classified_correctly"]]
    if bad:
        raise CheckFailed(
            "misclassified: "
            + "; ".join(f"{c['case']}: {c['outcome']}: {c['reason']}" for c in bad)
            + f" | {text}"
        )
    return text
