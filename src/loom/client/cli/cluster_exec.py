"""`loom cluster exec NAME [--node M] -- CMD`: run a command on one member of a cluster.

It goes through the head's Jobs API (over the coordinator's tunnel, like `loom job`): a
small driver runs CMD as a Ray task pinned to the chosen Ray node (hard node affinity),
streams its output line by line (stdout and stderr merged, as in a job's log) and exits
with its exit status; the job's logs are streamed here as they come.
"""

from __future__ import annotations

import shlex
from typing import Annotated

import typer

from loom.client.cli.common import fail
from loom.client.cli.job import follow_job, jobs_client

# Runs on the cluster with Ray's Python; only the standard library and ray.
DRIVER = """
import subprocess, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
sel, cmd = sys.argv[1], sys.argv[2:]
ray.init(log_to_driver=False)
head = ray.get_runtime_context().get_node_id()
alive = [n for n in ray.nodes() if n.get("Alive")]
alive.sort(key=lambda n: (n["NodeID"] != head, n["NodeID"]))
if sel.isdigit() and 1 <= int(sel) <= len(alive):
    node = alive[int(sel) - 1]
else:
    found = [n for n in alive if n["NodeID"].startswith(sel)] if not sel.isdigit() else []
    if len(found) != 1:
        hint = f"use 1..{len(alive)} (1 is the head) or a Ray node id prefix"
        print(f"no Ray node {sel!r}: {hint}; nodes:", file=sys.stderr)
        for i, n in enumerate(alive, 1):
            print(f"  {i}  {n['NodeID']}  {n['NodeManagerAddress']}", file=sys.stderr)
        sys.exit(2)
    node = found[0]
@ray.remote(num_cpus=0)
def run(cmd):
    # A streaming generator: each line reaches the driver (and so the job log) as it comes.
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except (FileNotFoundError, PermissionError) as exc:
        yield ("line", f"{exc}\\n")
        yield ("exit", 127)
        return
    for line in p.stdout:
        yield ("line", line)
    yield ("exit", p.wait())
strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
code = 1
for ref in run.options(scheduling_strategy=strategy).remote(cmd):
    kind, value = ray.get(ref)
    if kind == "line":
        sys.stdout.write(value)
        sys.stdout.flush()
    else:
        code = value
sys.exit(code)
"""


def exec_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="cluster name or id")],
    command: Annotated[list[str] | None, typer.Argument(help="command to run, after --")] = None,
    node: Annotated[
        str, typer.Option(help="member: 1 is the head, 2.. the workers, or a Ray node id prefix")
    ] = "1",
) -> None:
    """Run COMMAND (after --) on one member as a Ray task pinned to that node; streams its
    output; exits 0 only if the command succeeded."""
    if not command:
        fail("give the command to run after --, e.g. `-- hostname`", field="command")
    if not node.strip() or any(c.isspace() for c in node):
        fail(f"--node {node!r}: give a number (1 is the head) or a Ray node id", field="node")
    entrypoint = shlex.join(["python", "-c", DRIVER, node, *command])
    with jobs_client(ctx, name) as jobs:
        job_id = jobs.submit_job(entrypoint=entrypoint)
        raise typer.Exit(follow_job(jobs, job_id, quiet=True))
