"""Hardware-challenge benchmark: prover time vs verifier CPU time.

Runs whole challenges of the ``cpu`` class (verifier here, NumPy prover in a child process
speaking JSON over a pipe) and prints,
as the median of a few runs: prover wall and CPU time, verifier CPU time
(``time.process_time``), their ratio and the verifier's cost per opening. It also times one
opening at ``h100-sxm`` shapes (K = 65536, b = 32), which is what the coordinator pays per
opening of a real GPU challenge, and — only when PyTorch sees a CUDA GPU — a whole GPU
challenge of ``--gpu-class``.

    .venv/bin/python bench/challenge.py [--runs 3] [--append-results] [--gpu-class h100-sxm]

``--append-results`` appends a ``## challenge`` section to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import platform
import statistics
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from loom.agent.prover import NumpyProver, Prover, TorchProver, cuda_available
from loom.core.challenge import (
    ChallengeParams,
    ChallengeStart,
    NonceRelease,
    OpeningsRequest,
    OpeningsResponse,
    RootCommit,
    VerifierSession,
    format_rate,
    params_for,
    tile_digest,
)
from loom.core.challenge.opening import recompute_tile

RESULTS = Path(__file__).with_name("RESULTS.md")


@dataclass
class Run:
    passed: bool
    prover_wall: float
    prover_cpu: float
    verifier_cpu: float
    openings_cpu: float
    rate: float


def _prover_process(conn: Connection, backend: str, device: str) -> None:
    """The agent side, in its own process so that its CPU (and BLAS threads) are its own.

    Speaks JSON over the pipe, like the agent over its WebSocket.
    """
    key = Ed25519PrivateKey.generate()
    conn.send(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex())
    start = ChallengeStart.model_validate_json(conn.recv())
    w0, c0 = time.perf_counter(), time.process_time()
    prover: Prover
    if backend == "torch":
        prover = TorchProver(start.spec, key.sign, device=device)
    else:
        prover = NumpyProver(start.spec, key.sign)
    prover.add_start(start)
    while not prover.done:
        commit = prover.prove_next()
        if commit is None:
            prover.add_nonce(NonceRelease.model_validate_json(conn.recv()))
            continue
        conn.send(commit.model_dump_json())
    response = prover.answer(OpeningsRequest.model_validate_json(conn.recv()))
    conn.send(response.model_dump_json())
    conn.send((time.perf_counter() - w0, time.process_time() - c0))


def one_challenge(params: ChallengeParams, backend: str = "numpy", device: str = "cpu") -> Run:
    """One challenge: verifier here, prover in a child process; the verifier's CPU is
    measured with ``time.process_time`` around each of its calls."""
    here, there = mp.Pipe()
    child = mp.get_context("spawn").Process(target=_prover_process, args=(there, backend, device))
    child.start()
    pub = bytes.fromhex(here.recv())
    v_cpu = 0.0
    c0 = time.process_time()
    session = VerifierSession(params, "bench-device", pub)
    start = session.start(now=time.monotonic()).model_dump_json()
    v_cpu += time.process_time() - c0
    here.send(start)
    for _ in range(params.rounds):
        text = here.recv()
        arrival = time.monotonic()
        c0 = time.process_time()
        release = session.on_commit(RootCommit.model_validate_json(text), arrival)
        out = release.model_dump_json() if release is not None else None
        v_cpu += time.process_time() - c0
        if out is not None:
            here.send(out)
    c0 = time.process_time()
    request = session.draw_openings().model_dump_json()
    v_cpu += time.process_time() - c0
    here.send(request)
    text = here.recv()
    c0 = time.process_time()
    result = session.verify_openings(OpeningsResponse.model_validate_json(text))
    o_cpu = time.process_time() - c0
    v_cpu += o_cpu
    p_wall, p_cpu = here.recv()
    child.join()
    return Run(result.passed, p_wall, p_cpu, v_cpu, o_cpu, result.measured_rate or 0.0)


def opening_cost(params: ChallengeParams, reps: int = 3) -> float:
    """CPU seconds to regenerate and digest one tile at ``params`` shapes (median)."""
    times = []
    for r in range(reps):
        seed = os.urandom(32)
        c0 = time.process_time()
        tile_digest(recompute_tile(params, seed, r, r + 1), r, r, r + 1)
        times.append(time.process_time() - c0)
    return statistics.median(times)


def summarize(name: str, params: ChallengeParams, runs: list[Run]) -> list[str]:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    pw = med([r.prover_wall for r in runs])
    pc = med([r.prover_cpu for r in runs])
    vc = med([r.verifier_cpu for r in runs])
    oc = med([r.openings_cpu for r in runs])
    arithmetic = params.rounds * params.m * params.n / (params.openings * params.tile**2)
    return [
        f"| {name} | {params.m}×{params.n}×{params.k}, b={params.tile}, R={params.rounds}, "
        f"k={params.openings} | {sum(r.passed for r in runs)}/{len(runs)} | "
        f"{format_rate(med([r.rate for r in runs]))} | {pw:.2f} s | {pc:.2f} s | "
        f"{vc * 1e3:.0f} ms | {pc / vc:,.0f} | {oc / params.openings * 1e3:.1f} ms | "
        f"{arithmetic:,.0f} |"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--append-results", action="store_true")
    ap.add_argument("--gpu-class", default="h100-sxm")
    ap.add_argument("--date", default=dt.date.today().isoformat())
    ap.add_argument(
        "--machine", default=f"{os.cpu_count()}-core {platform.machine()}, NumPy {np.__version__}"
    )
    args = ap.parse_args()

    header = [
        "| class | shape | passed | best-window rate | prover wall | prover CPU | "
        "verifier CPU | CPU ratio | opening check (each) | arithmetic ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows: list[str] = []
    cpu = params_for("cpu")
    rows += summarize("cpu (NumPy)", cpu, [one_challenge(cpu) for _ in range(args.runs)])
    if cuda_available():
        gpu = params_for(args.gpu_class)
        runs = [one_challenge(gpu, "torch", "cuda") for _ in range(args.runs)]
        rows += summarize(f"{args.gpu_class} (torch CUDA)", gpu, runs)
        gpu_note = f"GPU: {args.gpu_class} challenge run on CUDA."
    else:
        gpu_note = "GPU: no CUDA device here — no GPU prover figures (rates stay assumptions)."

    h100 = params_for("h100-sxm")
    per_open = opening_cost(h100)
    lines = [
        *header,
        *rows,
        "",
        f"Verifier cost of one h100-sxm opening (K={h100.k}, b={h100.tile}): "
        f"{per_open * 1e3:.0f} ms CPU; k={h100.openings} openings ≈ "
        f"{per_open * h100.openings:.1f} s CPU per GPU challenge; arithmetic ratio "
        f"R·M·N/(k·b²) = {h100.rounds * h100.m * h100.n / (h100.openings * h100.tile**2):.2g}.",
        gpu_note,
    ]
    print("\n".join(lines))

    if args.append_results:
        if not RESULTS.exists():
            RESULTS.write_text("# Benchmark results\n", encoding="utf-8")
        section = [
            "",
            "## challenge",
            "",
            f"{args.date} — {args.machine}. `bench/challenge.py --runs {args.runs}`, medians. "
            "Verifier in the bench process, prover in a child process (JSON over a pipe); "
            "CPU ratio = prover CPU / verifier CPU, both `time.process_time` "
            "(the prover's BLAS threads count in its CPU time).",
            "",
            *lines,
            "",
        ]
        with RESULTS.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(section))


if __name__ == "__main__":
    main()
