"""Runtimes: command construction, and real sandboxes (bubblewrap, plain process)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loom.agent.runtimes import (
    MARKER_ENV,
    BwrapRuntime,
    DockerRuntime,
    ProcessRuntime,
    RunSpec,
    RuntimeUnavailable,
    SandboxError,
    find_marked,
    find_sandboxes,
    probe_bwrap,
    probe_docker,
    select_runtime,
)
from loom.agent.runtimes.bwrap import (
    SandboxFds,
    build_bwrap_argv,
    nvidia_device_nodes,
    sandbox_env_args,
)
from loom.agent.runtimes.docker import build_docker_argv, write_env_file

needs_bwrap = pytest.mark.skipif(
    probe_bwrap() is not None, reason=f"bubblewrap unusable: {probe_bwrap()}"
)

SECRET = "s3cr3t-token-0123456789abcdef"


def _spec(tmp_path: Path, argv: list[str], marker: str, **kw: object) -> RunSpec:
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    return RunSpec(
        argv=argv,
        env={"PATH": "/usr/bin:/bin", "SECRET_TOKEN": SECRET},
        cwd=work,
        marker=marker,
        name=marker,
        home=home,
        rw_paths=[work],
        log_path=tmp_path / "out.log",
        **kw,  # type: ignore[arg-type]
    )


def _wait_gone(marker: str, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = find_marked(marker)
        if not left:
            return []
        time.sleep(0.1)
    return find_marked(marker)


# ----------------------------------------------------------------------------- selection


def test_select_runtime_names() -> None:
    assert isinstance(select_runtime("process"), ProcessRuntime)
    with pytest.raises(ValueError, match="unknown runtime"):
        select_runtime("chroot")


@needs_bwrap
def test_default_runtime_is_bwrap() -> None:
    assert isinstance(select_runtime(None), BwrapRuntime)
    assert isinstance(select_runtime("bwrap"), BwrapRuntime)


def test_missing_bwrap_says_how_to_install() -> None:
    with pytest.raises(RuntimeUnavailable, match="apt-get install bubblewrap"):
        BwrapRuntime(bwrap="loom-no-such-bwrap")


# ----------------------------------------------------------------------------- argv


def test_bwrap_argv_shape_and_no_secrets(tmp_path: Path) -> None:
    spec = _spec(tmp_path, ["/bin/true"], "m1", hide_paths=[tmp_path])
    fds = SandboxFds(env=7, seccomp=8, passwd=9, group=10)
    argv = build_bwrap_argv(
        spec, "bwrap", fds=fds, as_root=True, uid=1_100_000_001, gid=1_100_000_001
    )
    joined = " ".join(argv)
    assert SECRET not in joined  # the environment travels in the --args file, not argv
    assert argv[1:3] == ["--args", "7"]
    assert SECRET in sandbox_env_args(spec) and sandbox_env_args(spec)[0] == "--clearenv"
    for flag in ("--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc"):
        assert flag in argv
    assert "--unshare-net" not in argv  # host network unless RunSpec.netns is given
    # an allow-list: never the host's root, its homes, /srv, /var, /mnt, /opt, /run
    binds = [argv[i + 2] for i, a in enumerate(argv) if a in ("--ro-bind", "--bind")]
    assert "/" not in binds and "/usr" in binds
    for hidden in ("/home", "/root", "/srv", "/var", "/mnt", "/media", "/opt", "/run"):
        assert hidden not in binds
    assert argv[argv.index("--seccomp") + 1] == "8"
    assert argv[argv.index("9") - 1 : argv.index("9") + 2] == ["--ro-bind-data", "9", "/etc/passwd"]
    assert argv[argv.index("--cap-drop") : argv.index("--cap-drop") + 2] == ["--cap-drop", "ALL"]
    assert argv[argv.index(str(spec.cwd)) - 1] == "--bind"
    assert "--reuid=1100000001" in argv and "--clear-groups" in argv
    assert argv[-4:] == ["/usr/bin/env", f"--chdir={spec.cwd}", "--", "/bin/true"]
    with pytest.raises(SandboxError, match="unprivileged uid"):
        build_bwrap_argv(spec, "bwrap", fds=fds, as_root=True, uid=0, gid=0)
    # a non-root agent: an unprivileged user namespace of the agent's own uid
    user = build_bwrap_argv(spec, "bwrap", fds=fds, as_root=False)
    assert "--unshare-user" in user and "--disable-userns" in user
    assert user[-3:] == [str(spec.cwd), "--", "/bin/true"]


def test_only_allocated_gpu_nodes(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidia2", "nvidia3", "nvidiactl", "nvidia-uvm"):
        (dev / name).touch()
    got = {p.name for p in nvidia_device_nodes([1, 3], dev)}
    assert got == {"nvidia1", "nvidia3", "nvidiactl", "nvidia-uvm"}
    assert nvidia_device_nodes([], dev) == []


def test_docker_argv_and_env_file(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        ["ray", "start", "--block"],
        "loom-abc-123",
        gpu_indices=[2, 0],
        num_cpus=4.0,
        memory_bytes=8 << 30,
        shm_bytes=1 << 30,
        pids_max=4096,
        labels={"loom.cluster": "c1"},
    )
    env_file = tmp_path / "env"
    profile = tmp_path / "seccomp.json"
    argv = build_docker_argv(
        spec,
        "rayproject/ray:2.60.0",
        env_file,
        user=(1_100_000_007, 1_100_000_007),
        seccomp_profile=profile,
    )
    # the same policy as bwrap: own uid, no capabilities, seccomp, limits, read-only image
    assert argv[argv.index("--user") + 1] == "1100000007:1100000007"
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert "no-new-privileges" in argv and f"seccomp={profile}" in argv
    assert argv[argv.index("--pids-limit") + 1] == str(spec.pids_max)
    assert "--read-only" in argv and argv[argv.index("--ipc") + 1] == "private"
    with pytest.raises(SandboxError, match="network namespace"):
        build_docker_argv(RunSpec(**{**spec.__dict__, "netns": Path("/run/netns/x")}), "i", None)
    assert argv[:4] == ["docker", "run", "--rm", "--init"]
    assert argv[argv.index("--network") : argv.index("--network") + 2] == ["--network", "host"]
    assert argv[argv.index("--gpus") + 1] == '"device=0,2"'
    assert argv[argv.index("--cpus") + 1] == "4"
    assert argv[argv.index("--memory") + 1] == f"{8 << 30}b"
    assert "loom.cluster=c1" in argv and "loom.marker=loom-abc-123" in argv
    assert f"{spec.cwd}:{spec.cwd}:rw" in argv
    assert argv[-4:] == ["rayproject/ray:2.60.0", "ray", "start", "--block"]
    assert SECRET not in " ".join(argv)
    write_env_file(spec, env_file)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    lines = env_file.read_text().splitlines()
    assert f"SECRET_TOKEN={SECRET}" in lines and f"{MARKER_ENV}=loom-abc-123" in lines


@pytest.mark.skipif(probe_docker() is not None, reason=f"no Docker engine: {probe_docker()}")
def test_docker_real(tmp_path: Path) -> None:  # pragma: no cover - needs an engine
    rt = DockerRuntime(image="busybox")
    spec = _spec(tmp_path, ["sh", "-c", "echo hi; sleep 60"], "loom-dockertest")
    handle = rt.spawn(spec)
    time.sleep(2)
    handle.kill_tree(grace=2)
    assert handle.poll() is not None
    done = subprocess.run(
        ["docker", "ps", "-aq", "--filter", "label=loom.marker=loom-dockertest"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.stdout.strip() == ""


# ----------------------------------------------------------------------------- real sandboxes

PROBE_SCRIPT = r"""
set -u
echo "home=$HOME token=$SECRET_TOKEN"
touch /etc/loom-escape 2>/dev/null && echo "WROTE_ETC"
touch "$HOST_FILE_DIR/loom-escape" 2>/dev/null && echo "WROTE_HOST_DIR"
touch "$HOME/ok" && echo "HOME_RW"
touch ./ok && echo "WORK_RW"
touch /tmp/sandbox-tmp-file && echo "TMP_RW"
ls /tmp | tr '\n' ' '; echo
test -e "$HOST_TMP_FILE" && echo "SEES_HOST_TMP"
echo "dev: $(ls /dev | tr '\n' ' ')"
echo "procs: $(ls /proc | grep -c '^[0-9]')"
echo "pid1: $(cat /proc/1/comm)"
"""


@needs_bwrap
def test_bwrap_sandbox_isolates(tmp_path: Path) -> None:
    host_tmp_file = Path("/tmp") / f"loom-host-visible-{os.getpid()}"
    host_tmp_file.write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    try:
        spec = _spec(tmp_path, ["/bin/sh", "-c", PROBE_SCRIPT], "loom-test-iso")
        spec = RunSpec(
            **{
                **spec.__dict__,
                "env": {
                    **spec.env,
                    "HOST_FILE_DIR": str(Path(sys.prefix)),
                    "HOST_TMP_FILE": str(host_tmp_file),
                },
                "hide_paths": [outside],
            }
        )
        handle = BwrapRuntime().spawn(spec)
        assert handle.wait(30) == 0
        handle.kill_tree()
        out = (tmp_path / "out.log").read_text()
    finally:
        host_tmp_file.unlink()
    assert f"token={SECRET}" in out
    assert "HOME_RW" in out and "WORK_RW" in out and "TMP_RW" in out
    assert "WROTE_ETC" not in out and "WROTE_HOST_DIR" not in out
    assert not Path("/etc/loom-escape").exists()
    assert "SEES_HOST_TMP" not in out  # private /tmp
    assert not Path("/tmp/sandbox-tmp-file").exists()
    assert (spec.home / "ok").exists() and (spec.cwd / "ok").exists()
    dev = out.split("dev: ", 1)[1].splitlines()[0].split()
    assert set(dev) <= {
        "core", "fd", "full", "null", "ptmx", "pts", "random", "shm",
        "stderr", "stdin", "stdout", "tty", "urandom", "zero",
    }  # fmt: skip
    assert not any(d.startswith("nvidia") for d in dev)
    procs = int(out.split("procs: ", 1)[1].split()[0])
    assert procs < 10  # own PID namespace: only the sandbox's few processes
    assert "pid1: bwrap" in out


@needs_bwrap
def test_bwrap_sandbox_dies_with_parent(tmp_path: Path) -> None:
    """SIGKILL the process that spawned the sandbox: nothing of the sandbox survives."""
    marker = f"loom-test-orphan-{os.getpid()}"
    parent_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from loom.agent.runtimes import BwrapRuntime, RunSpec\n"
        "p = Path(sys.argv[1]); m = sys.argv[2]\n"
        "spec = RunSpec(argv=['/bin/sh', '-c', 'sleep 600 & sleep 600 & wait'],"
        " env={'PATH': '/usr/bin:/bin'}, cwd=p, marker=m, name=m)\n"
        "BwrapRuntime().spawn(spec)\n"
        "print('spawned', flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code, str(tmp_path), marker], stdout=subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == b"spawned"
        deadline = time.monotonic() + 10
        while len(find_marked(marker)) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        # bwrap (outer), bwrap (pid 1), sh, 2 x sleep
        assert len(find_marked(marker)) >= 4
        assert marker in find_sandboxes("loom-test-orphan-")
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert _wait_gone(marker) == []


@needs_bwrap
def test_bwrap_kill_tree(tmp_path: Path) -> None:
    spec = _spec(tmp_path, ["/bin/sh", "-c", "sleep 600 & sleep 600 & wait"], "loom-test-kt")
    handle = BwrapRuntime().spawn(spec)
    deadline = time.monotonic() + 10
    while len(find_marked(spec.marker)) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert handle.main_pids(), "the sandboxed command is found under bwrap's PID 1"
    handle.kill_tree(grace=2)
    handle.kill_tree(grace=2)  # idempotent
    assert find_marked(spec.marker) == []
    assert handle.poll() is not None


def test_process_runtime_kills_escaped_children(tmp_path: Path) -> None:
    """A child that left the process group (setsid) is still found by the marker sweep."""
    script = "setsid sleep 600 & sleep 600 & trap '' TERM; wait"
    spec = _spec(tmp_path, ["/bin/sh", "-c", script], f"loom-test-proc-{os.getpid()}")
    handle = ProcessRuntime().spawn(spec)
    deadline = time.monotonic() + 10
    while len(find_marked(spec.marker)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(find_marked(spec.marker)) == 3
    started = time.monotonic()
    handle.kill_tree(grace=1)  # the shell ignores SIGTERM: SIGKILL after the grace
    assert time.monotonic() - started < 8
    assert find_marked(spec.marker) == []
    handle.kill_tree()


def _host_gpus() -> list[int]:
    return sorted(
        int(p.name[6:]) for p in Path("/dev").glob("nvidia[0-9]*") if p.name[6:].isdigit()
    )


@pytest.mark.gpu
@needs_bwrap
@pytest.mark.skipif(not _host_gpus(), reason="no /dev/nvidiaN device nodes on this machine")
def test_bwrap_sees_only_allocated_gpus(tmp_path: Path) -> None:  # pragma: no cover - GPU
    gpu = _host_gpus()[-1]
    spec = _spec(tmp_path, ["/bin/sh", "-c", "ls /dev"], "loom-test-gpu", gpu_indices=[gpu])
    handle = BwrapRuntime().spawn(spec)
    assert handle.wait(30) == 0
    handle.kill_tree()
    seen = {n for n in (tmp_path / "out.log").read_text().split() if n.startswith("nvidia")}
    assert f"nvidia{gpu}" in seen and "nvidiactl" in seen
    assert not {f"nvidia{i}" for i in _host_gpus() if i != gpu} & seen
