"""The last step of bench/gpu_check.py: a 1-node cluster through `loom cluster up` in the
bubblewrap sandbox, and a Ray task inside it (``gpu_check.py ray-task``) that multiplies on
the GPU with torch and lists the /dev/nvidia* nodes it sees."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from gpu_check_net import Network, tail
from gpu_check_steps import CheckFailed, Ctx, Skip, nvidia_nodes, shared_network, version_of
from loom.agent.netns import driver_prefix

# ---------------------------------------------------------------------- Ray in bwrap


def step_cluster_sandbox(ctx: Ctx, reserve: float) -> str:
    """`loom cluster up` (1 node, the GPU or 1 CPU) in bwrap, then a Ray task inside."""
    reason = ctx.facts.get("bwrap_reason")
    if reason is not None:
        if ctx.gpu:
            raise CheckFailed(f"bubblewrap is not usable: {reason}")
        raise Skip(f"bubblewrap is not usable here: {reason}")
    ray_version = version_of("ray")
    if ray_version is None or ray_version.startswith("not importable"):
        raise CheckFailed(f"ray: {ray_version}")
    d = ctx.data
    if ctx.gpu and not ctx.facts.get("own_gpu_verified"):
        # The GPU failed (or never finished) its class challenge, so it is not placeable
        # with require_verified; run the sandbox part on a coordinator that places claimed
        # devices, and say so. Its GPU challenge then runs in the background meanwhile.
        net = ctx.network(require_verified=False, name="net-unverified")
        agent = net.add_agent("check-nvml", runtime="bwrap")
        net.wait_node(agent, ctx.timeout(60, reserve))
        d["require_verified"] = False
        d["why_unverified"] = "the GPU did not pass its class challenge in challenge_own_class"
    else:
        net = shared_network(ctx)
        have = net.agents.get("check-nvml")
        if have is None or not have.alive():  # the earlier step did not leave one running
            fresh = net.add_agent("check-nvml", runtime="bwrap")
            net.wait_node(fresh, ctx.timeout(60, reserve))
        d["require_verified"] = True
    net.call(
        lambda c: c.request("POST", "/v1/credits/deposit", json={"amount": "1000"}),
        ctx.timeout(90, reserve),
    )
    _wait_available(net, ctx.timeout(90, reserve))
    cmd = [ctx.python, "-m", "loom", "cluster", "up", "--nodes", "1"]
    if ctx.gpu:
        cmd += ["--gpu", f"{ctx.facts['gpu_class']}:1"]
    else:
        cmd += ["--cpus", "1"]
    # The spec's env may not carry PYTHONPATH or LD_LIBRARY_PATH (loader hooks are
    # refused), so the sandboxed Python finds Ray the way any supplier's would: installed
    # for that interpreter (gpu_check.sh writes a .pth there when it carries wheels).
    env = net.base_env(net.client_home)
    name = "gpucheck"
    cluster = _cluster_up(ctx, env, [*cmd, "--name", name], reserve)
    d["attempts"] = [_brief(cluster)]
    if cluster.get("state") != "running" and ctx.left(reserve) > 150:
        # One more try: a head can time out starting on a starved machine.
        _cluster_down(ctx, env, name)
        name = "gpucheck-retry"
        cluster = _cluster_up(ctx, env, [*cmd, "--name", name], reserve)
        d["attempts"].append(_brief(cluster))
    d["cluster_up_s"] = cluster["_up_s"]
    d["cluster"] = {k: cluster.get(k) for k in ("state", "reason", "head_address", "timings")}
    d["members"] = [
        {k: m.get(k) for k in ("role", "state", "devices", "node_name", "reason")}
        for m in cluster.get("members", [])
    ]
    try:
        if cluster.get("state") != "running":
            logs = {n: tail(a.log, 1500) for n, a in net.agents.items()}
            raise CheckFailed(f"cluster {cluster.get('state')}: {cluster.get('reason')} {logs}")
        allocated = sorted(
            int(dev.rsplit(":gpu", 1)[1])
            for m in cluster.get("members", [])
            for dev in m.get("devices", [])
            if ":gpu" in dev
        )
        task_env = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=str(cluster["ray_token"]))
        # A driver on this machine runs in the head's network namespace when it has one
        # (members cannot open connections to the host; see loom.agent.netns).
        head = str(cluster["head_address"])
        prefix = driver_prefix(head)
        d["driver_prefix"] = prefix
        task_cmd = [*prefix, ctx.python, str(ctx.script), "ray-task", "--address", head]
        if ctx.gpu:
            task_cmd.append("--gpu")
        task_timeout = ctx.timeout(150, reserve + 20)
        t1 = time.monotonic()
        task = subprocess.run(
            task_cmd, env=task_env, capture_output=True, text=True, timeout=task_timeout
        )
        d["task_s"] = round(time.monotonic() - t1, 2)
        lines = [ln for ln in task.stdout.splitlines() if ln.startswith("{")]
        if task.returncode != 0 or not lines:
            raise CheckFailed(f"the Ray task failed ({task.returncode}): {task.stderr[-2000:]}")
        seen = json.loads(lines[-1])
        d["inside"] = seen
        d["host_dev_nvidia"] = nvidia_nodes()
        numbered = [n for n in seen.get("dev_nvidia", []) if n.removeprefix("nvidia").isdigit()]
        extra = [n for n in numbered if int(n.removeprefix("nvidia")) not in allocated]
        d["allocated_gpu_indices"] = allocated
        d["unallocated_nvidia_visible"] = extra
        problems = []
        if extra:
            problems.append(f"unallocated GPU nodes visible in the sandbox: {extra}")
        if not seen.get("in_sandbox"):
            problems.append("the task did not run inside a Loom sandbox (no LOOM_SANDBOX)")
        if not seen.get("matmul", {}).get("ok"):
            problems.append(f"matmul inside the sandbox: {seen.get('matmul')}")
        if ctx.gpu and not seen.get("cuda_available"):
            problems.append(f"CUDA not usable inside the sandbox: {seen.get('cuda_error')}")
        if not ctx.gpu and numbered:
            problems.append(f"a CPU member sees GPU nodes: {numbered}")
        if problems:
            raise CheckFailed("; ".join(problems))
    finally:
        d["cluster_down_exit"] = _cluster_down(ctx, env, name)
    mm = seen["matmul"]
    where = seen.get("device_name") or "CPU"
    return (
        f"cluster up in {d['cluster_up_s']:.1f} s; task on {where} inside bwrap: "
        f"{mm.get('what')} {mm.get('tflops', 0):.1f} TFLOP/s ok; /dev/nvidia* inside: "
        f"{seen.get('dev_nvidia')} (allocated {allocated})"
    )


def _cluster_up(ctx: Ctx, env: dict[str, str], cmd: list[str], reserve: float) -> dict[str, Any]:
    """`loom cluster up … --json`: the cluster as it printed it, plus ``_up_s``."""
    up_timeout = ctx.timeout(150, reserve + 30)
    cmd = [*cmd, "--duration", "20m", "--json", "--timeout", str(int(up_timeout))]
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=up_timeout + 20)
    try:
        cluster = dict(json.loads(done.stdout))
    except (ValueError, TypeError):
        raise CheckFailed(
            f"`loom cluster up` exited {done.returncode}: {(done.stderr or done.stdout)[-1500:]}"
        ) from None
    cluster["_up_s"] = round(time.monotonic() - t0, 2)
    return cluster


def _brief(cluster: dict[str, Any]) -> dict[str, Any]:
    return {k: cluster.get(k) for k in ("name", "state", "reason", "_up_s")}


def _cluster_down(ctx: Ctx, env: dict[str, str], name: str) -> int:
    down = subprocess.run(
        [ctx.python, "-m", "loom", "cluster", "down", name, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    return down.returncode


def _wait_available(net: Network, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = net.call(lambda c: c.nodes(), max(1.0, deadline - time.monotonic()))
        if any(n.state == "available" for n in nodes):
            return
        time.sleep(0.3)
    raise CheckFailed(f"no node became available within {timeout:.0f} s")
