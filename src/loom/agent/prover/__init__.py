"""The agent's side of the hardware challenge: compute rounds, commit, answer openings.

Sans-IO: the caller moves messages and supplies a ``sign(bytes) -> bytes`` callable (the
node's Ed25519 key). Computing a round is blocking (CPU or GPU), so an asyncio agent runs
:meth:`Prover.prove_next` in a worker thread while it keeps receiving nonces::

    prover = make_prover(start.spec, sign)          # NumPy, or PyTorch on CUDA if present
    prover.add_start(start)                          # spec check + nonces of rounds 0..d-1
    while not prover.done:
        commit = prover.prove_next()                 # None: waiting for a nonce
        if commit is None: wait for a NonceRelease; prover.add_nonce(release); continue
        send(commit)
    send(prover.answer(openings_request))            # OpeningsResponse
    prover.discard()

``add_nonce`` and ``prove_next`` only touch a dict and an int; call them from one thread,
or guard them with a lock if the compute thread and the receive loop differ.
"""

from __future__ import annotations

from loom.agent.prover.base import Prover, ProverCancelled, ProverError, Signer
from loom.agent.prover.numpy_prover import NumpyProver
from loom.agent.prover.torch_prover import TorchProver, cuda_available, torch_available
from loom.core.challenge.messages import ChallengeSpec


def make_prover(spec: ChallengeSpec, sign: Signer, *, prefer_gpu: bool = True) -> Prover:
    """A PyTorch/CUDA prover when torch and a GPU are present (and wanted), else NumPy."""
    if prefer_gpu and cuda_available():
        return TorchProver(spec, sign, device="cuda")
    return NumpyProver(spec, sign)


__all__ = [
    "NumpyProver",
    "Prover",
    "ProverCancelled",
    "ProverError",
    "Signer",
    "TorchProver",
    "cuda_available",
    "make_prover",
    "torch_available",
]
