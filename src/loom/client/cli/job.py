"""`loom job …`: Ray jobs on a cluster, through the head's Jobs API over the tunnel.

Each command opens an in-process forward to an ephemeral local port for its own duration
and authenticates to Ray with the cluster's token (only the owner gets it).
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from loom.client.cli.common import EXIT_API, client_for, console, fail, print_json
from loom.client.forward import background_forward

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

app = typer.Typer(help="Ray jobs: submit, logs, list, stop.", no_args_is_help=True)

FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@contextmanager
def jobs_client(ctx: typer.Context, name: str) -> Iterator[JobSubmissionClient]:
    """A Jobs API client for the cluster's head, through a forward that lives as long."""
    with client_for(ctx) as loom:
        cluster = loom.cluster(name)
        if cluster.state not in ("running", "healing"):
            fail(f"cluster {cluster.name} is {cluster.state}; jobs need it running", EXIT_API)
        with background_forward(loom.base_url, loom.key, cluster.id, "dashboard") as port:
            try:
                yield _job_client(f"http://127.0.0.1:{port}", cluster.ray_token)
            except typer.Exit:
                raise  # a RuntimeError to click, but not an error here
            except Exception as exc:  # Ray's and aiohttp's errors: one line, no traceback
                fail(f"Ray Jobs API: {_first_line(exc)}", EXIT_API, error_code="ray_jobs")


def _job_client(address: str, token: str) -> JobSubmissionClient:
    # Imported here, not at the top: Ray adds about a second to every `loom` command.
    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})


def check_job_id(job_id: str) -> None:
    if not job_id.strip() or any(c.isspace() or c == "/" for c in job_id):
        fail(
            f"job id {job_id!r} is not a job id; `loom job list NAME` shows them",
            field="job_id",
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@app.command("submit")
def submit(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="cluster name or id")],
    entrypoint: Annotated[list[str], typer.Argument(help="command to run, after --")],
    working_dir: Annotated[
        Path | None, typer.Option(help="directory uploaded to the cluster as the job's cwd")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream logs to the end")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Submit `ENTRYPOINT` (e.g. `-- python train.py`) as a Ray job."""
    runtime_env: dict[str, Any] = {}
    if working_dir is not None:
        if not working_dir.is_dir():
            fail(f"--working-dir {working_dir} is not a directory")
        runtime_env["working_dir"] = str(working_dir.resolve())
    if not entrypoint:
        fail("give the command to run after --, e.g. `-- python train.py`", field="entrypoint")
    # One argv element per word as the user typed it: the shell on the head sees it quoted.
    command = entrypoint[0] if len(entrypoint) == 1 else shlex.join(entrypoint)
    with jobs_client(ctx, name) as jobs:
        job_id = jobs.submit_job(entrypoint=command, runtime_env=runtime_env or None)
        if json_out and not follow:
            print_json({"job_id": job_id})
            return
        console.print(f"submitted job [bold]{escape(job_id)}[/]", highlight=False)
        if follow:
            raise typer.Exit(follow_job(jobs, job_id))


@app.command("logs")
def logs(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="cluster name or id")],
    job_id: Annotated[str, typer.Argument(help="job (submission) id")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="until the job ends")] = False,
) -> None:
    """Print a job's logs (with --follow: stream them until it ends; exit 1 if it failed)."""
    check_job_id(job_id)
    with jobs_client(ctx, name) as jobs:
        if follow:
            raise typer.Exit(follow_job(jobs, job_id))
        typer.echo(jobs.get_job_logs(job_id), nl=False)


@app.command("list")
def list_jobs(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="cluster name or id")],
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The cluster's submitted jobs, newest first."""
    with jobs_client(ctx, name) as jobs:
        # Submitted jobs only: Ray client drivers are listed too, but have no logs to fetch.
        submitted = [j for j in jobs.list_jobs() if j.submission_id]
        details = sorted(submitted, key=lambda j: j.start_time or 0, reverse=True)
    rows: list[dict[str, Any]] = [
        {
            "job_id": d.submission_id,
            "status": str(getattr(d.status, "value", d.status)),
            "entrypoint": d.entrypoint,
            "start_time": (d.start_time or 0) / 1000 or None,
            "end_time": (d.end_time or 0) / 1000 or None,
            "message": d.message or "",
        }
        for d in details
    ]
    if json_out:
        print_json(rows)
        return
    if not rows:
        console.print("no jobs yet; submit one with `loom job submit NAME -- python train.py`")
        return
    table = Table("job id", "status", "started", "entrypoint")
    for row in rows:
        started = row["start_time"]
        when = time.strftime("%H:%M:%S", time.localtime(float(started))) if started else "-"
        table.add_row(str(row["job_id"]), str(row["status"]), when, escape(str(row["entrypoint"])))
    console.print(table)


@app.command("stop")
def stop(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="cluster name or id")],
    job_id: Annotated[str, typer.Argument(help="job (submission) id")],
) -> None:
    """Stop a running job."""
    check_job_id(job_id)
    with jobs_client(ctx, name) as jobs:
        stopped = jobs.stop_job(job_id)
    console.print(f"job {escape(job_id)} " + ("stopping" if stopped else "was not running"))


def follow_job(jobs: JobSubmissionClient, job_id: str, *, quiet: bool = False) -> int:
    """Stream logs until the job ends; the exit code says whether it succeeded
    (`quiet`: no status line, for `cluster exec`)."""

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            typer.echo(chunk, nl=False)

    asyncio.run(tail())
    status = str(jobs.get_job_status(job_id))
    deadline = time.monotonic() + 30
    while not any(s in status for s in FINAL) and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(jobs.get_job_status(job_id))
    status = status.rsplit(".", 1)[-1]
    if not quiet:
        console.print(f"job {escape(job_id)}: {status}", highlight=False)
    return 0 if status == "SUCCEEDED" else 1
