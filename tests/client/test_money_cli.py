"""`loom credits|offers|quote|earnings|payout|ledger` as a user runs them: exit codes, --json."""

from __future__ import annotations

import json
from pathlib import Path

from test_cli import loom

from support.servers import CoordinatorThread


def test_money_commands(coordinator: CoordinatorThread, tmp_path: Path) -> None:
    home = tmp_path / "h"
    url = coordinator.url
    out = loom(home, "credits", "deposit", "12.5", "--idempotency-key", "k1", coordinator=url)
    assert out.returncode == 0, out.stderr
    assert "12.5" in out.stdout
    again = loom(home, "credits", "deposit", "12.5", "--idempotency-key", "k1", coordinator=url)
    assert again.returncode == 0 and "replayed" in again.stdout
    balance = json.loads(loom(home, "credits", "balance", "--json", coordinator=url).stdout)
    assert balance == {"balance": "12.5", "escrowed": "0", "earnings": "0"}
    bad = loom(home, "credits", "deposit", "0.0000001", coordinator=url)
    assert bad.returncode == 2 and "6 decimal places" in bad.stderr
    query = loom(home, "offers", "gpu=rtx4090 price<=abc", coordinator=url)
    assert query.returncode == 2 and "^^^" in query.stderr
    assert json.loads(loom(home, "offers", "--json", coordinator=url).stdout) == []
    payout = loom(home, "payout", "request", "1", coordinator=url)
    assert payout.returncode == 1 and "insufficient_earnings" in payout.stderr
    spec = tmp_path / "c.yaml"
    spec.write_text("resources:\n  cpus: 1\n")
    quote = loom(home, "quote", str(spec), coordinator=url)
    assert quote.returncode == 1 and "no_capacity" in quote.stderr
    verify = loom(home, "ledger", "verify", coordinator=url)
    assert verify.returncode == 0 and "1 transactions" in verify.stdout
    history = json.loads(loom(home, "credits", "history", "--json", coordinator=url).stdout)
    assert [(h["kind"], h["amount"]) for h in history] == [("deposit", "12.5")]
