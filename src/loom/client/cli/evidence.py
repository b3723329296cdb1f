"""`loom evidence …`: download fraud evidence, and re-check it offline.

`loom evidence verify FILE` needs no coordinator and no key: it re-derives the challenge
id, checks the node's signature over the root, the Merkle path, regenerates the inputs and
recomputes the tile (``loom.core.challenge.verify_evidence``). Exit codes:

* 0 — the file proves fraud: the node's key signed a root under which a tile's committed
  digest is wrong;
* 1 — the file does not hold (bad signature, bad path, or the digest is in fact correct);
* 2 — the file cannot be read or is not JSON.

FILE may be one evidence object (as saved by `loom evidence list --save DIR`), an item of
`GET /v1/evidence` (its `evidence` field is checked), or a list of either (every one must
hold for exit 0).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from loom.client.cli.common import (
    EXIT_API,
    EXIT_USAGE,
    client_for,
    console,
    err_console,
    fail,
    print_json,
)
from loom.core.challenge import verify_evidence

app = typer.Typer(
    help="Fraud evidence from hardware challenges: download it, re-check it offline.",
    no_args_is_help=True,
)


def _items(data: Any) -> list[Any]:
    items = data if isinstance(data, list) else [data]
    return [i["evidence"] if isinstance(i, dict) and "evidence" in i else i for i in items]


@app.command("verify")
def verify(
    file: Annotated[Path, typer.Argument(help="evidence JSON file")],
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Re-check evidence offline; exit 0 only if it proves a wrong commitment."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}", EXIT_USAGE)
    except ValueError as exc:
        fail(f"{file} is not JSON: {exc}", EXIT_USAGE)
    results: list[tuple[bool, str]] = []
    for item in _items(data):
        results.append(verify_evidence(item) if isinstance(item, dict) else (False, "not JSON"))
    if not results:
        results = [(False, "the file holds no evidence")]
    if json_out:
        print_json([{"proven": ok, "explanation": why} for ok, why in results])
    else:
        for ok, why in results:
            if ok:
                console.print(f"[bold green]PROVEN[/] {why}", highlight=False, soft_wrap=True)
            else:
                err_console.print(
                    f"[bold red]DOES NOT HOLD[/] {why}", highlight=False, soft_wrap=True
                )
    if not all(ok for ok, _ in results):
        raise typer.Exit(EXIT_API)


@app.command("list")
def list_evidence(
    ctx: typer.Context,
    node: Annotated[str | None, typer.Option(help="only this node's evidence")] = None,
    limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 100,
    save: Annotated[
        Path | None, typer.Option(help="write each item to DIR/<challenge>-<id>.json")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List (and download) the fraud evidence the coordinator stored."""
    with client_for(ctx) as client:
        rows = client.evidence(node=node, limit=limit)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        for row in rows:
            path = save / f"{row.challenge_id}-{row.id}.json"
            path.write_text(json.dumps(row.evidence, indent=2, sort_keys=True) + "\n")
    if json_out:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} evidence item(s)", title_justify="left")
    for col in ("id", "node", "device", "challenge", "when"):
        table.add_column(col)
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.created_at))
        table.add_row(str(row.id), row.node_id, row.device_id, row.challenge_id[:16] + "…", when)
    console.print(table)
    if save is not None:
        console.print(f"saved to {save}; re-check with `loom evidence verify FILE`")
