"""A dropped challenge stops computing, and a drained agent never waits on a worker thread
(the hung-agent bug: SIGTERM drained the members, then ``asyncio.run`` joined a prover thread
still in a round, and the agent never exited). Real NumPy rounds, real threads, real
processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import FrameType

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from loom.agent.prover import NumpyProver, ProverCancelled
from loom.agent.verification import ChallengeHandler
from loom.core.challenge import VerifierSession, params_for

#: A round of 16 blocks of 1,024 rows: seconds of NumPy on this machine, so there is a
#: "mid-round" to cancel in.
BIG = params_for("cpu").model_copy(update={"m": 16384})


def _prover() -> NumpyProver:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    session = VerifierSession(BIG, "dev-1", pub)
    start = session.start(now=0.0)
    prover = NumpyProver(start.spec, key.sign)
    prover.add_start(start)
    return prover


def test_cancel_stops_a_round_at_the_next_block() -> None:
    prover = _prover()
    outcome: list[BaseException | object] = []

    def compute() -> None:
        try:
            outcome.append(prover.compute_round(0))
        except BaseException as exc:
            outcome.append(exc)

    whole = time.monotonic()
    thread = threading.Thread(target=compute, daemon=True)
    thread.start()
    time.sleep(0.3)  # inside the round
    cancelled_at = time.monotonic()
    prover.cancel()
    thread.join(30)
    stopped = time.monotonic() - cancelled_at
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ProverCancelled), outcome
    assert prover.next_round == 0  # nothing committed
    # Stopped at a block boundary, long before the round could have finished (for the
    # ratio: one uncancelled round of the same size).
    fresh = _prover()
    began = time.monotonic()
    fresh.compute_round(0)
    full = time.monotonic() - began
    print(f"\ncancelled after {stopped:.2f} s; a whole round takes {full:.2f} s")
    assert stopped < full / 2, (stopped, full, time.monotonic() - whole)


def test_a_cancelled_prover_refuses_the_next_round() -> None:
    prover = _prover()
    prover.discard()  # what dropping a challenge does
    with pytest.raises(ProverCancelled):
        prover.compute_round(0)


EXITS = """
import asyncio, sys, time
from concurrent.futures import ThreadPoolExecutor
from loom.agent.cli import _stop_threads

async def main():
    executor = ThreadPoolExecutor()
    asyncio.get_running_loop().set_default_executor(executor)
    {work}
    await _stop_threads(executor, 1.0)
    print("returned", flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("work", "returns"),
    [
        ("await asyncio.to_thread(time.sleep, 0.1)", True),  # idle threads: a normal exit
        ("asyncio.get_running_loop().run_in_executor(None, time.sleep, 120)", False),  # stuck
    ],
)
def test_a_drained_agent_exits_even_with_a_busy_thread(
    work: str, returns: bool, tmp_path: Path
) -> None:
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EXITS).format(work=work)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    took = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    assert took < 30, took  # not the 120 s of the stuck thread
    assert ("returned" in done.stdout) is returns, done.stdout
    if not returns:
        assert "still busy" in done.stderr, done.stderr
        assert "Thread 0x" in done.stderr, done.stderr  # every thread's stack, for the log


def test_a_cancelled_round_leaves_no_thread_computing() -> None:
    """What dropping a challenge does to its driver: the awaiting task is cancelled, the
    prover told, and the round's thread has stopped computing when the cancel returns."""

    def computing() -> bool:
        return any(
            "numpy_prover" in f.f_code.co_filename or "digest" in f.f_code.co_filename
            for top in sys._current_frames().values()
            for f in _stack(top)
        )

    async def main() -> None:
        prover = _prover()
        fut = asyncio.ensure_future(ChallengeHandler._compute(prover))
        await asyncio.sleep(0.3)
        assert computing()
        fut.cancel()
        began = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await fut
        assert prover.cancelled and time.monotonic() - began < 5
        assert not computing()

    asyncio.run(main())


def _stack(frame: FrameType | None) -> list[FrameType]:
    out = []
    while frame is not None:
        out.append(frame)
        frame = frame.f_back
    return out


def test_a_round_survives_forks_made_meanwhile() -> None:
    """The cause of the hung agent: OpenBLAS's fork handler, run by a real ``fork()`` (a
    ``preexec_fn`` spawn, as a member start makes) while another thread was in a BLAS
    product, left that product waiting for ever. Without the gate this round never ends."""
    prover = _prover()
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(prover.compute_round(0)), daemon=True)
    thread.start()
    began = time.monotonic()
    forks = 0
    while thread.is_alive() and forks < 300:
        subprocess.run(["true"], preexec_fn=lambda: None, check=True)
        forks += 1
    thread.join(60)
    assert not thread.is_alive(), f"the round hung after {forks} forks"
    assert len(outcome) == 1 and prover.next_round == 1
    print(f"\n{forks} forks during a {time.monotonic() - began:.2f} s round")
