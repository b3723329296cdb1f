"""`loom offers QUERY` and `loom quote SPEC.yaml`: what the network sells, and for how much."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from loom.client.cli.common import client_for, console, fail, print_json
from loom.client.sdk import LoomAPIError
from loom.core.query import QueryError, parse_query
from loom.core.spec import SpecError, format_duration, load_spec


def offers(
    ctx: typer.Context,
    query: Annotated[
        str,
        typer.Argument(
            metavar="QUERY",
            help='e.g. "gpu=rtx4090 gpus>=2 region in [eu-west,us-east] price<=0.40"',
        ),
    ] = "",
    sort: Annotated[str, typer.Option(help="price, reliability, vram, gpus… (-price: desc)")] = (
        "price"
    ),
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Search live offers with the offer query language."""
    try:
        parse_query(query)  # a typo is reported at once, coordinator or not
    except QueryError as exc:
        fail(str(exc))
    with client_for(ctx) as client:
        try:
            rows = client.offers(query, sort=sort, limit=limit)
        except LoomAPIError as exc:
            if exc.code in ("invalid_query", "invalid_sort"):
                fail(exc.message)  # the caret message, exit 2: the input is wrong
            raise
    if json_out:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} offer(s)", title_justify="left")
    for col in ("node", "gpu", "count", "vram", "cpus", "ram", "region", "price/h", "verified"):
        table.add_column(col)
    for o in rows:
        table.add_row(
            o.node_name,
            o.gpu,
            str(o.gpus),
            f"{o.vram_gb:g} GB" if o.vram_gb else "",
            str(o.cpus),
            f"{o.ram_gb:g} GB",
            o.region + (f" ({o.country})" if o.country else ""),
            o.price,
            "✓" if o.verified else "",
        )
    console.print(table)


def quote(
    ctx: typer.Context,
    spec_file: Annotated[Path, typer.Argument(help="cluster spec (YAML)")],
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Price a cluster spec now: per hour, for its duration, and against cloud list prices."""
    try:
        text = spec_file.read_text()
    except OSError as exc:
        fail(f"cannot read {spec_file}: {exc.strerror}")
    try:
        spec = load_spec(text)
    except SpecError as exc:
        fail(f"{spec_file}: {exc}")
    with client_for(ctx) as client:
        out = client.quote(spec.model_dump(mode="json", exclude_none=True))
    if json_out:
        print_json(out)
        return
    what = f"{out.devices} × {out.model}"
    console.print(f"[bold]{what}[/] for {format_duration(out.duration_s)}")
    console.print(f"  price      {out.price_per_hour} credits/hour")
    console.print(f"  total      {out.total} credits (escrow held at `cluster up`: {out.escrow})")
    if out.hyperscaler_price_per_hour is not None:
        console.print(
            f"  clouds     {out.hyperscaler_price_per_hour}/hour at the hyperscaler median "
            f"(AWS, GCP, Azure list prices; 1 credit = 1 USD): total {out.hyperscaler_total}"
        )
        console.print(f"  saving     [green]{out.saving_pct} %[/]")
    if out.cheapest_cloud is not None:
        console.print(
            f"  cheapest   {out.cheapest_cloud} at {out.cheapest_cloud_price}/GPU-hour "
            f"(saving {out.saving_vs_cheapest_pct} %)"
        )
    if out.hyperscaler_price_per_hour is None and out.cheapest_cloud is None:
        console.print("  (no reference cloud price for this model)")
