"""The agent's side of the hardware challenge: command handlers over the WebSocket.

``challenge.start`` (a ChallengeStart) picks a prover for the targeted device and starts
computing in a worker thread; each round's signed root goes up at once as a
``challenge.commit`` report. ``challenge.nonce`` (a NonceRelease) hands the prover the next
nonce; ``challenge.open`` (an OpeningsRequest) answers with the OpeningsResponse in the ack;
``challenge.abort`` drops the challenge.

Devices are ``<node_id>:cpu`` (the NumPy prover) and ``<node_id>:gpu<index>`` (the
PyTorch prover on ``cuda:<index>``). A GPU that this machine cannot drive (no PyTorch, no
CUDA, no such index) is refused at once with the reason: the coordinator records the claim
as failed, which is what a declared GPU that is not there deserves. Computing an H100-sized
challenge on the CPU instead would only burn the machine for minutes to fail the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loom.agent.main import Agent, Handler, handler, handlers
from loom.agent.prover import (
    NumpyProver,
    Prover,
    ProverCancelled,
    ProverError,
    Signer,
    TorchProver,
)
from loom.agent.prover import cuda_available as _cuda_available
from loom.core.challenge import ChallengeSpec, OpeningsResponse, RootCommit
from loom.protocol.commands import (
    ChallengeAbort,
    ChallengeAborted,
    ChallengeAccepted,
    ChallengeNonce,
    ChallengeOpen,
    ChallengeStart,
    NonceTaken,
)

log = logging.getLogger(__name__)

ProverFactory = Callable[[ChallengeSpec, Signer], Prover]

#: How long a finished challenge waits for its openings before it is dropped.
OPENINGS_GRACE_S = 300.0
#: How long a dropped challenge waits for its round in progress to stop.
CANCEL_WAIT_S = 5.0


@dataclass
class _Run:
    prover: Prover
    deadline: float
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


def _gpu_count() -> int:
    if not _cuda_available():
        return 0
    torch = importlib.import_module("torch")
    return int(torch.cuda.device_count())


class ChallengeHandler:
    """Serves the coordinator's challenges for one agent (one run per device at a time)."""

    def __init__(
        self,
        agent: Agent,
        *,
        cpu_prover: ProverFactory | None = None,
        gpu_prover: Callable[[ChallengeSpec, Signer, int], Prover] | None = None,
        max_runs: int = 8,
    ) -> None:
        self.agent = agent
        self._cpu_prover = cpu_prover or NumpyProver
        self._gpu_prover = gpu_prover or self._torch_prover
        self._max_runs = max_runs
        self._runs: dict[bytes, _Run] = {}

    def handlers(self) -> dict[str, Handler[Any]]:
        return handlers(
            handler(ChallengeStart, self.start),
            handler(ChallengeNonce, self.nonce),
            handler(ChallengeOpen, self.open),
            handler(ChallengeAbort, self.abort),
        )

    # ------------------------------------------------------------------ commands
    async def start(self, cmd: ChallengeStart) -> ChallengeAccepted:
        start = cmd.message()
        spec = start.spec
        for cid, run in list(self._runs.items()):  # a new challenge replaces an old one
            if run.prover.spec.device_id == spec.device_id:
                self._drop(cid)
        if len(self._runs) >= self._max_runs:
            raise ProverError(f"already running {len(self._runs)} challenges")
        prover = self._prover_for(spec)
        prover.add_start(start)
        run = _Run(prover, deadline=time.monotonic() + spec.params.hard_timeout_s)
        self._runs[spec.challenge_id] = run
        run.task = asyncio.create_task(self._drive(spec.challenge_id, run))
        return ChallengeAccepted(backend=prover.backend, device=spec.device_id)

    async def nonce(self, cmd: ChallengeNonce) -> NonceTaken:
        release = cmd.message()
        run = self._runs.get(release.challenge_id)
        if run is None:
            return NonceTaken(known=False)
        run.prover.add_nonce(release)
        run.wake.set()
        return NonceTaken(known=True)

    async def open(self, cmd: ChallengeOpen) -> OpeningsResponse:
        request = cmd.message()
        run = self._runs.get(request.challenge_id)
        if run is None:
            raise ProverError("no such challenge here (expired or never started)")
        if not run.prover.done:
            raise ProverError("openings requested before the last round was committed")
        return await asyncio.to_thread(run.prover.answer, request)

    async def abort(self, cmd: ChallengeAbort) -> ChallengeAborted:
        return ChallengeAborted(dropped=self._drop(cmd.challenge_id))

    async def abort_all(self) -> None:
        """Drop every challenge and wait for rounds in progress to stop (the agent is
        draining: nothing may keep a worker thread, and the CPU, busy after it)."""
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        for cid in list(self._runs):
            self._drop(cid)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ internals
    def _prover_for(self, spec: ChallengeSpec) -> Prover:
        node_id = self.agent.node_id
        prefix, _, which = spec.device_id.rpartition(":")
        if node_id is None or prefix != node_id:
            raise ProverError(f"device {spec.device_id!r} is not one of this node's devices")
        sign = self.agent.node_key.sign
        if which == "cpu":
            return self._cpu_prover(spec, sign)
        if which.startswith("gpu") and which[3:].isdigit():
            return self._gpu_prover(spec, sign, int(which[3:]))
        raise ProverError(f"unknown device {spec.device_id!r}")

    @staticmethod
    def _torch_prover(spec: ChallengeSpec, sign: Signer, index: int) -> Prover:
        count = _gpu_count()
        if index >= count:
            raise ProverError(
                f"gpu{index}: this machine has {count} CUDA device(s) usable by PyTorch; "
                "it cannot prove this GPU"
            )
        return TorchProver(spec, sign, device=f"cuda:{index}")

    async def _drive(self, cid: bytes, run: _Run) -> None:
        prover = run.prover
        try:
            while not prover.done:
                if not prover.ready():
                    run.wake.clear()
                    if prover.ready():
                        continue
                    remaining = run.deadline - time.monotonic()
                    if remaining <= 0:
                        log.info("challenge %s: no nonce in time; dropping it", cid.hex()[:12])
                        self._drop(cid)
                        return
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(run.wake.wait(), remaining)
                    continue
                commit = await self._compute(prover)
                await self.agent.report("challenge.commit", commit.model_dump(mode="json"))
            # Keep the commitments for the openings, then forget them.
            await asyncio.sleep(OPENINGS_GRACE_S)
            self._drop(cid)
        except asyncio.CancelledError:
            raise
        except ProverCancelled:
            log.info("challenge %s: dropped mid-round", cid.hex()[:12])
        except Exception:
            log.exception("challenge %s failed on this agent", cid.hex()[:12])
            self._drop(cid)

    @staticmethod
    async def _compute(prover: Prover) -> RootCommit:
        """One round in a worker thread. Cancelled (the challenge dropped), the round stops
        at its next block boundary and this waits for that (bounded), so a dropped or
        draining challenge leaves no thread computing behind it."""
        fut = asyncio.ensure_future(asyncio.to_thread(prover.compute_round, prover.next_round))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            prover.cancel()
            await asyncio.wait({fut}, timeout=CANCEL_WAIT_S)
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: ProverCancelled, or a round that just finished
            raise

    def _drop(self, cid: bytes) -> bool:
        run = self._runs.pop(cid, None)
        if run is None:
            return False
        run.prover.discard()
        if run.task is not None and run.task is not asyncio.current_task():
            run.task.cancel()
        return True
