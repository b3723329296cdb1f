"""The Loom SDK: a typed HTTP client that signs every request with the caller's key.

    from loom.client.sdk import LoomClient
    with LoomClient.from_env() as loom:
        for node in loom.nodes():
            print(node.name, node.state)

Tests can pass an `httpx` transport (e.g. `httpx.MockTransport`) to run without a server.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from loom.client.config import ClientConfig
from loom.protocol.api import AccountOut, ClusterOut, ErrorBody, Health, NodeOut
from loom.protocol.identity import IdentityError, KeyPair, parse_key_hex, sign_request
from loom.protocol.money import (
    BalanceOut,
    DepositRequest,
    EarningsOut,
    HistoryItem,
    LedgerTxnOut,
    LedgerVerifyOut,
    OfferOut,
    PayoutRequest,
    QuoteOut,
    QuoteRequest,
    TxnReceipt,
)
from loom.protocol.verification import ChallengeOut, EvidenceOut

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class LoomError(Exception):
    """Base for client-side errors; `str()` is a one-line reason for the user."""


class LoomConnectionError(LoomError):
    pass


class LoomAPIError(LoomError):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{message} [{code}]")
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class SigningAuth(httpx.Auth):
    """Signs method, path, query, body hash, timestamp and a fresh nonce."""

    requires_request_body = True

    def __init__(self, key: KeyPair) -> None:
        self.key = key

    def auth_flow(self, request: httpx.Request) -> Any:
        headers = sign_request(
            self.key,
            request.method,
            request.url.raw_path.split(b"?", 1)[0].decode("ascii"),  # as sent, encoded
            request.url.query.decode(),
            request.content,
            timestamp=int(time.time()),
        )
        request.headers.update(headers)
        yield request


class LoomClient:
    def __init__(
        self,
        base_url: str,
        key: KeyPair,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        self._http = httpx.Client(
            base_url=self.base_url, auth=SigningAuth(key), timeout=timeout, transport=transport
        )

    @classmethod
    def from_config(cls, config: ClientConfig, **kwargs: Any) -> LoomClient:
        return cls(config.coordinator, config.load_key(), **kwargs)

    @classmethod
    def from_env(cls, **kwargs: Any) -> LoomClient:
        return cls.from_config(ClientConfig.resolve(), **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LoomClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise LoomConnectionError(
                f"cannot reach the coordinator at {self.base_url} ({type(exc).__name__}): is it "
                "running? Start one with `loom coordinator serve` or `loom up`, "
                "or pass --coordinator"
            ) from None
        if response.status_code >= 400:
            raise _api_error(response)
        return response

    def _get(self, path: str, model: type[M], **kwargs: Any) -> M:
        return _parse(model, self.request("GET", path, **kwargs).json())

    def _get_list(self, path: str, model: type[M], **kwargs: Any) -> list[M]:
        data = self.request("GET", path, **kwargs).json()
        return TypeAdapter(list[model]).validate_python(data)  # type: ignore[valid-type]

    # -- API ------------------------------------------------------------------------------

    def health(self) -> Health:
        return self._get("/healthz", Health)

    def me(self) -> AccountOut:
        return self._get("/v1/me", AccountOut)

    def nodes(self, *, owner: str | None = None, state: str | None = None) -> list[NodeOut]:
        if owner is not None:
            try:
                parse_key_hex(owner, "owner")  # the one spelling the coordinator accepts
            except IdentityError as exc:
                raise LoomError(str(exc)) from None
        params = {k: v for k, v in (("owner", owner), ("state", state)) if v}
        return self._get_list("/v1/nodes", NodeOut, params=params)

    def node(self, node_id: str) -> NodeOut:
        return self._get(f"/v1/nodes/{node_id}", NodeOut)

    def remove_node(self, node_id: str) -> NodeOut:
        """Remove a node this key owns (its agent must be stopped); it is never placed again."""
        return _parse(NodeOut, self.request("DELETE", f"/v1/nodes/{node_id}").json())

    # -- clusters ---------------------------------------------------------------------------

    def create_cluster(self, spec: dict[str, Any]) -> ClusterOut:
        """Place and reserve a cluster; provisioning continues in the background."""
        return _parse(ClusterOut, self.request("POST", "/v1/clusters", json={"spec": spec}).json())

    def cluster(self, ref: str) -> ClusterOut:
        """A cluster of yours by name or id."""
        return self._get(f"/v1/clusters/{ref}", ClusterOut)

    def clusters(self, *, all_states: bool = False) -> list[ClusterOut]:
        params = {"all": "true"} if all_states else {}
        return self._get_list("/v1/clusters", ClusterOut, params=params)

    def delete_cluster(self, ref: str) -> ClusterOut:
        """Tear a cluster down; returns once every member stopped."""
        return _parse(
            ClusterOut, self.request("DELETE", f"/v1/clusters/{ref}", timeout=120.0).json()
        )

    def wait_cluster(
        self, ref: str, *, timeout: float = 120.0, interval: float = 0.25
    ) -> ClusterOut:
        """Poll until the cluster is running, failed or terminated."""
        deadline = time.monotonic() + timeout
        while True:
            cluster = self.cluster(ref)
            if cluster.state in ("running", "failed", "terminated"):
                return cluster
            if time.monotonic() > deadline:
                raise LoomError(f"cluster {ref} still {cluster.state} after {timeout:.0f} s")
            time.sleep(interval)

    # -- money (credits, earnings, payouts, ledger, market) -------------------------------

    def deposit(self, amount: str, *, idempotency_key: str | None = None) -> TxnReceipt:
        body = DepositRequest(amount=amount, idempotency_key=idempotency_key)
        data = self.request("POST", "/v1/credits/deposit", json=body.model_dump()).json()
        return _parse(TxnReceipt, data)

    def balance(self) -> BalanceOut:
        return self._get("/v1/credits/balance", BalanceOut)

    def history(self, *, limit: int = 50, before: int | None = None) -> list[HistoryItem]:
        params: dict[str, int] = {"limit": limit}
        if before is not None:
            params["before"] = before
        return self._get_list("/v1/credits/history", HistoryItem, params=params)

    def earnings(self) -> EarningsOut:
        return self._get("/v1/earnings", EarningsOut)

    def payout(self, amount: str, *, idempotency_key: str | None = None) -> TxnReceipt:
        body = PayoutRequest(amount=amount, idempotency_key=idempotency_key)
        return _parse(
            TxnReceipt, self.request("POST", "/v1/payouts", json=body.model_dump()).json()
        )

    def ledger_verify(self) -> LedgerVerifyOut:
        return self._get("/v1/ledger/verify", LedgerVerifyOut)

    def ledger_transactions(self, *, after: int = 0, limit: int = 100) -> list[LedgerTxnOut]:
        params = {"after": after, "limit": limit}
        return self._get_list("/v1/ledger/transactions", LedgerTxnOut, params=params)

    def offers(self, query: str = "", *, sort: str = "price", limit: int = 100) -> list[OfferOut]:
        params: dict[str, str | int] = {"q": query, "sort": sort, "limit": limit}
        return self._get_list("/v1/offers", OfferOut, params=params)

    def quote(self, spec: dict[str, Any]) -> QuoteOut:
        data = self.request("POST", "/v1/quote", json=QuoteRequest(spec=spec).model_dump()).json()
        return _parse(QuoteOut, data)

    # -- hardware verification --------------------------------------------------------------

    def node_challenges(self, node_id: str, *, limit: int = 100) -> list[ChallengeOut]:
        """A node's hardware challenges, newest first, with measured rates."""
        return self._get_list(
            f"/v1/nodes/{node_id}/challenges", ChallengeOut, params={"limit": limit}
        )

    def evidence(self, *, node: str | None = None, limit: int = 100) -> list[EvidenceOut]:
        """Fraud evidence (re-check each item's `evidence` offline with verify_evidence)."""
        params: dict[str, Any] = {"limit": limit}
        if node:
            params["node"] = node
        return self._get_list("/v1/evidence", EvidenceOut, params=params)


def _parse(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise LoomError(
            f"unexpected answer from the coordinator: {exc.errors()[0]['msg']}"
        ) from None


def _api_error(response: httpx.Response) -> LoomAPIError:
    try:
        body = ErrorBody.model_validate(response.json())
        return LoomAPIError(
            response.status_code, body.error.code, body.error.message, body.error.field
        )
    except (ValueError, ValidationError):
        text = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
        return LoomAPIError(
            response.status_code, "http_error", f"HTTP {response.status_code} {text}"
        )
