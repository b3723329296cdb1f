"""`loom challenge classes`: the hardware-challenge classes this Loom ships, and where each
class's reference rate comes from: an assumption, or a measured run of
``bench/gpu_check.sh`` (date, GPU, driver, rate; recorded in ``bench/RESULTS.md``).

It reads the table shipped with this installation (``loom/core/data/challenge_params.yaml``)
and needs no coordinator and no key.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from loom.client.cli.common import console, print_json
from loom.core.challenge import ChallengeParams, device_classes, format_rate, params_for

app = typer.Typer(
    help="The hardware challenge: device classes and their rates.", no_args_is_help=True
)


def class_row(p: ChallengeParams) -> dict[str, Any]:
    """One class as `--json` shows it."""
    m = p.measured
    return {
        "class": p.device_class,
        "m": p.m,
        "n": p.n,
        "k": p.k,
        "rounds": p.rounds,
        "reference_rate": p.reference_rate,
        "required_rate": p.required_rate,
        "reference_rate_source": p.reference_rate_source,
        "measured": None if m is None else m.model_dump(mode="json"),
    }


def source_text(p: ChallengeParams) -> str:
    m = p.measured
    if m is None:
        return "assumed (never measured)"
    return (
        f"measured {m.date.isoformat()} on {m.gpu}, driver {m.driver}: "
        f"{format_rate(m.rate)} ({m.runs} run{'s' if m.runs != 1 else ''}, {m.source})"
    )


@app.command("classes")
def classes(
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Each device class: shape, reference rate, and whether that rate is measured."""
    table = [params_for(name) for name in device_classes()]
    if json_out:
        print_json([class_row(p) for p in table])
        return
    out = Table()
    for col in ("class", "M×N×K", "rounds", "P_ref", "required", "P_ref source"):
        out.add_column(col)
    for p in table:
        out.add_row(
            p.device_class,
            f"{p.m}×{p.n}×{p.k}",
            str(p.rounds),
            format_rate(p.reference_rate),
            format_rate(p.required_rate),
            source_text(p),
        )
    console.print(out)
