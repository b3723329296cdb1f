"""The coordinator's side of one hardware challenge, as a sans-IO state machine.

The caller owns the transport and the clock: it passes every arrival time (a monotonic
clock reading on the coordinator) and sends whatever the session returns::

    session = VerifierSession(params, device_id, node_public_key)
    send(session.start(now=monotonic()))              # ChallengeStart: spec + d nonces
    for each RootCommit received:
        nxt = session.on_commit(commit, arrival_time=monotonic())
        if nxt is not None: send(nxt)                  # NonceRelease for round r+d
        if session.result is not None: stop            # failed early (bad signature, …)
    (periodically) session.check_timeout(monotonic())
    send(session.draw_openings())                      # after the last root
    result = session.verify_openings(response)         # CPU-heavy: run in a worker thread

Misbehaviour by the prover ends the session with a failed :class:`ChallengeResult`; misuse
by the caller (wrong order of calls, a clock going backwards) raises
:class:`ChallengeStateError`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from enum import StrEnum

from loom.core.challenge.evidence import build_evidence
from loom.core.challenge.messages import (
    ChallengeResult,
    ChallengeSpec,
    ChallengeStart,
    Evidence,
    NonceRelease,
    Opening,
    OpeningRequest,
    OpeningsRequest,
    OpeningsResponse,
    RootCommit,
)
from loom.core.challenge.opening import check_opening
from loom.core.challenge.params import ChallengeParams
from loom.core.challenge.timing import WindowScore, best_window, format_rate
from loom.core.challenge.transcript import (
    NONCE_BYTES,
    SEED_BYTES,
    root_statement,
    verify_ed25519,
)

Entropy = Callable[[int], bytes]
"""Source of secret random bytes, ``secrets.token_bytes`` by default."""


class ChallengeStateError(RuntimeError):
    """The caller used the session out of order (a bug in the caller, not the prover)."""


class SessionState(StrEnum):
    NEW = "new"
    AWAITING_ROOTS = "awaiting_roots"
    AWAITING_OPENINGS = "awaiting_openings"
    DONE = "done"


def _uniform(entropy: Entropy, n: int) -> int:
    """Uniform integer in [0, n) by rejection sampling on 64-bit draws."""
    if n <= 0:
        raise ValueError("empty range")
    limit = (1 << 64) - ((1 << 64) % n)
    while True:
        x = int.from_bytes(entropy(8), "big")
        if x < limit:
            return x % n


class VerifierSession:
    """One challenge of one device. Not thread-safe: drive it from one task."""

    def __init__(
        self,
        params: ChallengeParams,
        device_id: str,
        node_public_key: bytes,
        *,
        entropy: Entropy = secrets.token_bytes,
        seed0: bytes | None = None,
    ) -> None:
        if len(node_public_key) != 32:
            raise ValueError("node_public_key must be a raw 32-byte Ed25519 public key")
        self.params = params
        self.node_public_key = node_public_key
        self._entropy = entropy
        self.spec = ChallengeSpec.create(
            device_id, params, seed0 if seed0 is not None else entropy(SEED_BYTES)
        )
        self._nonces = [entropy(NONCE_BYTES) for _ in range(params.rounds)]
        self._commits: list[RootCommit] = []
        self._arrivals: list[float] = []
        self._started_at: float | None = None
        self._score: WindowScore | None = None
        self._requests: list[OpeningRequest] | None = None
        self.state = SessionState.NEW
        self.result: ChallengeResult | None = None

    # ------------------------------------------------------------------ accessors
    @property
    def challenge_id(self) -> bytes:
        return self.spec.challenge_id

    @property
    def deadline(self) -> float | None:
        """Monotonic time by which the last root must have arrived (None before start)."""
        if self._started_at is None:
            return None
        return self._started_at + self.params.hard_timeout_s

    @property
    def arrivals(self) -> list[float]:
        return list(self._arrivals)

    @property
    def score(self) -> WindowScore | None:
        """The best timing window, known once every root has arrived."""
        return self._score

    def _release(self, round_index: int) -> NonceRelease:
        return NonceRelease(
            challenge_id=self.challenge_id, round=round_index, nonce=self._nonces[round_index]
        )

    # ------------------------------------------------------------------ protocol
    def start(self, now: float) -> ChallengeStart:
        """Begin: the spec and the nonces of rounds 0..d−1 (``now`` starts the hard timeout)."""
        if self.state is not SessionState.NEW:
            raise ChallengeStateError("start() called twice")
        self._started_at = now
        self.state = SessionState.AWAITING_ROOTS
        first = min(self.params.depth, self.params.rounds)
        return ChallengeStart(spec=self.spec, nonces=[self._release(r) for r in range(first)])

    def on_commit(self, commit: RootCommit, arrival_time: float) -> NonceRelease | None:
        """Like :meth:`on_root`, from the wire message (checks its challenge id too)."""
        if commit.challenge_id != self.challenge_id and self.state is SessionState.AWAITING_ROOTS:
            self._fail("a root arrived for another challenge id")
            return None
        return self.on_root(commit.round, commit.root, commit.signature, arrival_time)

    def on_root(
        self, round_index: int, root: bytes, signature: bytes, arrival_time: float
    ) -> NonceRelease | None:
        """Record root ``round_index`` received at ``arrival_time`` (coordinator monotonic).

        Returns the nonce to release next (round ``round_index + d``) or None. After a
        failure (see :attr:`result`) further roots are ignored and None is returned.
        """
        if self.state is SessionState.DONE:
            return None
        if self.state is not SessionState.AWAITING_ROOTS:
            raise ChallengeStateError(f"on_root() in state {self.state.value}")
        if self._arrivals and arrival_time < self._arrivals[-1]:
            raise ChallengeStateError("arrival times must come from a monotonic clock")
        deadline = self.deadline
        assert deadline is not None
        expected = len(self._commits)
        if arrival_time > deadline:
            self._fail(
                f"timed out: root {expected} of {self.params.rounds} had not arrived "
                f"{self.params.hard_timeout_s:.1f} s after the start"
            )
            return None
        if round_index != expected:
            self._fail(f"protocol: root for round {round_index} arrived, round {expected} expected")
            return None
        if len(root) != 32:
            self._fail(f"protocol: root of round {round_index} is not 32 bytes")
            return None
        statement = root_statement(self.challenge_id, round_index, self._nonces[round_index], root)
        if not verify_ed25519(self.node_public_key, signature, statement):
            self._fail(
                f"root of round {round_index} is not signed by the node's key for this "
                "challenge and nonce"
            )
            return None
        self._commits.append(
            RootCommit(
                challenge_id=self.challenge_id, round=round_index, root=root, signature=signature
            )
        )
        self._arrivals.append(arrival_time)
        if len(self._commits) == self.params.rounds:
            self._score = best_window(self._arrivals, self.params.window, self.params.ops_per_round)
            self.state = SessionState.AWAITING_OPENINGS
        nxt = round_index + self.params.depth
        return self._release(nxt) if nxt < self.params.rounds else None

    def check_timeout(self, now: float) -> ChallengeResult | None:
        """Fail the session if the roots are overdue at ``now``; returns the result if so."""
        deadline = self.deadline
        if self.state is SessionState.AWAITING_ROOTS and deadline is not None and now > deadline:
            self._fail(
                f"timed out: {len(self._commits)} of {self.params.rounds} roots arrived within "
                f"{self.params.hard_timeout_s:.1f} s"
            )
            return self.result
        return None

    def abort(self, reason: str) -> ChallengeResult:
        """End the session as failed for a reason outside the protocol (e.g. disconnect)."""
        if self.result is None:
            self._fail(reason)
        assert self.result is not None
        return self.result

    def draw_openings(self) -> OpeningsRequest:
        """Draw the k tiles to open, with fresh randomness, once every root is in.

        k_w are distinct tiles of the best window's rounds, the rest distinct tiles of any
        round. Calling it again (even after the verdict) returns the same request.
        """
        if self._requests is not None:
            return OpeningsRequest(challenge_id=self.challenge_id, openings=list(self._requests))
        if self.state is not SessionState.AWAITING_OPENINGS:
            raise ChallengeStateError(f"draw_openings() in state {self.state.value}")
        self._requests = self._draw()
        return OpeningsRequest(challenge_id=self.challenge_id, openings=list(self._requests))

    def _draw(self) -> list[OpeningRequest]:
        p = self.params
        score = self._score
        assert score is not None
        chosen: set[tuple[int, int, int]] = set()
        out: list[OpeningRequest] = []

        def pick(first_round: int, n_rounds: int) -> None:
            while True:
                idx = _uniform(self._entropy, n_rounds * p.tiles_per_round)
                r, rest = divmod(idx, p.tiles_per_round)
                ti, tj = divmod(rest, p.tile_cols)
                key = (first_round + r, ti, tj)
                if key not in chosen:
                    chosen.add(key)
                    out.append(OpeningRequest(round=key[0], tile_row=ti, tile_col=tj))
                    return

        for _ in range(p.openings_in_window):
            pick(score.rounds.start, score.window)
        for _ in range(p.openings - p.openings_in_window):
            pick(0, p.rounds)
        return out

    def verify_openings(self, response: OpeningsResponse | Sequence[Opening]) -> ChallengeResult:
        """Check every requested opening and decide. CPU cost: k tile recomputations."""
        if self.state is SessionState.DONE:
            assert self.result is not None
            return self.result
        if self.state is not SessionState.AWAITING_OPENINGS or self._requests is None:
            raise ChallengeStateError("verify_openings() before draw_openings()")
        if isinstance(response, OpeningsResponse):
            if response.challenge_id != self.challenge_id:
                return self._fail("openings answered for another challenge id")
            openings: Sequence[Opening] = response.openings
        else:
            openings = response

        by_key: dict[tuple[int, int, int], Opening] = {}
        for op in openings:
            key = (op.round, op.tile_row, op.tile_col)
            if key in by_key:
                return self._fail(f"protocol: tile {key} opened twice")
            by_key[key] = op
        wanted = {(q.round, q.tile_row, q.tile_col) for q in self._requests}
        if set(by_key) != wanted:
            missing, extra = len(wanted - set(by_key)), len(set(by_key) - wanted)
            return self._fail(
                f"protocol: openings do not answer the request ({missing} missing, {extra} "
                "not requested)"
            )

        failures: list[str] = []
        evidence: list[Evidence] = []
        for q in self._requests:
            op = by_key[(q.round, q.tile_row, q.tile_col)]
            commit = self._commits[q.round]
            nonce = self._nonces[q.round]
            check = check_opening(self.spec, nonce, commit.root, op)
            if check.ok:
                continue
            failures.append(check.detail)
            if check.status == "wrong_digest":
                assert check.claimed_digest is not None
                assert check.true_digest is not None
                evidence.append(
                    build_evidence(
                        self.spec,
                        self.node_public_key,
                        nonce,
                        commit,
                        op,
                        check.claimed_digest,
                        check.true_digest,
                    )
                )
        return self._decide(failures, evidence)

    # ------------------------------------------------------------------ decisions
    def _timing_text(self) -> tuple[bool, str]:
        p, s = self.params, self._score
        if s is None:
            return False, "timing: not enough roots to score a window"
        need = (
            f"{format_rate(p.required_rate)} required = {p.lam:.0%} of the "
            f"{format_rate(p.reference_rate)} {p.device_class} reference"
        )
        ok = s.rate >= p.required_rate
        verdict = "ran at" if ok else "only ran at"
        return ok, (
            f"best {s.window}-round window (rounds {s.rounds.start}-{s.rounds.stop - 1}, "
            f"{s.seconds:.3f} s) {verdict} {format_rate(s.rate)} ({need})"
        )

    def _decide(self, failures: list[str], evidence: list[Evidence]) -> ChallengeResult:
        p = self.params
        timing_ok, timing_text = self._timing_text()
        checked = len(self._requests or [])
        parts: list[str] = []
        if failures:
            head = f"{len(failures)} of {checked} openings wrong"
            if evidence:
                head += f" ({len(evidence)} with signed fraud evidence)"
            parts.append(f"{head}: {failures[0]}")
        if not timing_ok:
            parts.append(f"too slow for {p.device_class}: {timing_text}")
        passed = not parts
        if passed:
            reason = f"passed: {timing_text}; all {checked} openings correct"
        else:
            reason = "failed: " + "; ".join(parts)
        self.result = ChallengeResult(
            challenge_id=self.challenge_id,
            device_id=self.spec.device_id,
            device_class=p.device_class,
            passed=passed,
            reason=reason,
            measured_rate=self._score.rate if self._score else None,
            required_rate=p.required_rate,
            best_window_start=self._score.start if self._score else None,
            timing_passed=timing_ok,
            openings_checked=checked,
            openings_failed=len(failures),
            evidence=evidence,
        )
        self.state = SessionState.DONE
        return self.result

    def _fail(self, reason: str) -> ChallengeResult:
        score = self._score
        self.result = ChallengeResult(
            challenge_id=self.challenge_id,
            device_id=self.spec.device_id,
            device_class=self.params.device_class,
            passed=False,
            reason=f"failed: {reason}",
            measured_rate=score.rate if score else None,
            required_rate=self.params.required_rate,
            best_window_start=score.start if score else None,
            timing_passed=bool(score and score.rate >= self.params.required_rate),
        )
        self.state = SessionState.DONE
        return self.result
