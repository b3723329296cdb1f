"""The Docker runtime: each member is one container, where configured.

The container runs attached (``docker run`` stays in the foreground, so the agent's handle
lives exactly as long as the container), with ``--rm``, ``--init`` and:

* ``--network host`` — Ray nodes talk to each other directly (see bwrap.py for why);
* ``--gpus device=<indices>`` — only the allocated GPUs (needs the NVIDIA container toolkit);
* ``--cpus`` / ``--memory`` / ``--shm-size`` from the member's allocation — unlike bwrap,
  Docker enforces memory and CPU limits through cgroups;
* labels ``loom.member`` / ``loom.marker`` (and the caller's, e.g. ``loom.cluster``),
  so ``docker ps --filter label=...`` finds a member's container after an agent crash;
* the member's directories bind-mounted at the same paths, HOME set to its home;
* the environment via an ``--env-file`` (mode 0600, in the member's dir): secrets such
  as the Ray token never appear on a command line, and the user's variables reach only
  the container (the docker client itself gets a fixed environment);
* the same policy as bubblewrap: ``--user UID:GID`` (a uid of its own when the agent is
  root), ``--cap-drop ALL``, ``no-new-privileges``, the seccomp policy of
  :mod:`loom.agent.runtimes.seccomp` as a profile file, ``--pids-limit``, a read-only
  image filesystem with a private ``/tmp``, a private IPC namespace. A member's network
  namespace (``RunSpec.netns``) cannot be joined by Docker: such a spec is refused.

The image must contain the same Ray version as the cluster (default:
``rayproject/ray:<installed ray version>``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from loom.agent.runtimes.base import (
    ProcessHandle,
    RunSpec,
    Runtime,
    RuntimeUnavailable,
    SandboxError,
    popen_in_new_session,
)
from loom.agent.runtimes.identity import UidLease, chown_tree, lease_uid
from loom.agent.runtimes.seccomp import docker_profile

_NAME_OK = re.compile(r"[^a-zA-Z0-9_.-]")


def default_image() -> str:
    try:
        version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        version = "latest"
    return f"rayproject/ray:{version}"


def container_name(spec: RunSpec) -> str:
    """A valid, unique container name for the member (derived from its marker)."""
    return "loom-" + _NAME_OK.sub("-", spec.marker)[:100]


def build_docker_argv(
    spec: RunSpec,
    image: str,
    env_file: Path | None,
    docker: str = "docker",
    *,
    user: tuple[int, int] | None = None,
    seccomp_profile: Path | None = None,
) -> list[str]:
    """The ``docker run`` command line for ``spec`` (pure: no engine needed)."""
    if spec.netns is not None:
        raise SandboxError(
            "the docker runtime cannot join a network namespace; use the bwrap runtime"
        )
    argv = [docker, "run", "--rm", "--init", "--name", container_name(spec), "--network", "host"]
    if user is not None:
        argv += ["--user", f"{user[0]}:{user[1]}"]
    argv += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    if seccomp_profile is not None:
        argv += ["--security-opt", f"seccomp={seccomp_profile}"]
    argv += ["--ipc", "private", "--read-only", "--tmpfs", "/tmp:rw,mode=1777"]
    if spec.pids_max is not None:
        argv += ["--pids-limit", str(spec.pids_max)]
    if spec.disk_bytes is not None:
        argv += ["--ulimit", f"fsize={spec.disk_bytes}:{spec.disk_bytes}"]
    argv += ["--label", f"loom.member={spec.name}", "--label", f"loom.marker={spec.marker}"]
    for key, value in sorted(spec.labels.items()):
        argv += ["--label", f"{key}={value}"]
    if spec.gpu_indices:
        devices = ",".join(str(i) for i in sorted(set(spec.gpu_indices)))
        argv += ["--gpus", f'"device={devices}"']
    if spec.num_cpus is not None:
        argv += ["--cpus", f"{spec.num_cpus:g}"]
    if spec.memory_bytes is not None:
        argv += ["--memory", f"{spec.memory_bytes}b", "--memory-swap", f"{spec.memory_bytes}b"]
    if spec.shm_bytes is not None:
        argv += ["--shm-size", f"{spec.shm_bytes}b"]
    mounts = [*spec.rw_paths, *([spec.home] if spec.home else []), spec.cwd]
    seen: set[str] = set()
    for p in mounts:
        if str(p) not in seen:
            seen.add(str(p))
            argv += ["--volume", f"{p}:{p}:rw"]
    for p in spec.ro_paths:
        argv += ["--volume", f"{p}:{p}:ro"]
    if env_file is not None:
        argv += ["--env-file", str(env_file)]
    argv += ["--workdir", str(spec.cwd), image, *spec.argv]
    return argv


def write_env_file(spec: RunSpec, path: Path) -> None:
    """Write the member's environment as a Docker env file, readable only by the agent."""
    lines = []
    for key, value in sorted(spec.full_env().items()):
        if "\n" in value or "\n" in key:
            raise SandboxError(f"environment variable {key!r} contains a newline")
        lines.append(f"{key}={value}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(lines)


@functools.cache
def probe_docker(docker: str = "docker") -> str | None:
    """None if a Docker engine answers, else the reason."""
    path = shutil.which(docker)
    if path is None:
        return "the docker client is not installed (https://docs.docker.com/engine/install/)"
    try:
        done = subprocess.run(
            [path, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=15,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the Docker engine did not answer `docker info`: {exc}"
    if done.returncode != 0 or not done.stdout.strip():
        err = done.stderr.decode(errors="replace").strip().splitlines()
        return f"no Docker engine answers ({err[-1] if err else done.returncode})"
    return None


class DockerHandle(ProcessHandle):
    """Handle on the attached ``docker run`` client; killing it removes the container."""

    def __init__(
        self, popen: subprocess.Popen[bytes], spec: RunSpec, docker: str, lease: UidLease
    ) -> None:
        super().__init__(popen, spec)
        self.lease = lease
        self._docker = docker
        self.container = container_name(spec)
        self._grace = 10.0

    def kill_tree(self, grace: float = 10.0) -> None:
        self._grace = grace
        try:
            super().kill_tree(grace)
        finally:
            self.lease.release()

    def _docker_cmd(self, *args: str) -> None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([self._docker, *args], capture_output=True, timeout=30, check=False)

    def main_pids(self) -> list[int]:
        # `docker stop` sends SIGTERM to the container's init, then SIGKILL after the grace.
        self._docker_cmd("stop", "--time", str(max(1, round(self._grace))), self.container)
        return []

    def _hard_kill(self) -> None:
        self._docker_cmd("rm", "--force", self.container)
        super()._hard_kill()


class DockerRuntime(Runtime):
    """Runs each member as a Docker container (see the module docstring)."""

    name = "docker"
    uses_host_python = False

    def __init__(
        self, image: str | None = None, docker: str = "docker", *, check: bool = True
    ) -> None:
        if check:
            reason = probe_docker(docker)
            if reason is not None:
                raise RuntimeUnavailable(reason)
        self.docker = shutil.which(docker) or docker
        self.image = image or default_image()

    def env_file_for(self, spec: RunSpec) -> Path:
        return spec.cwd / ".loom-docker.env"

    def seccomp_file_for(self, spec: RunSpec) -> Path:
        return spec.cwd / ".loom-seccomp.json"

    def argv_for(self, spec: RunSpec, user: tuple[int, int] | None = None) -> list[str]:
        return build_docker_argv(
            spec,
            self.image,
            self.env_file_for(spec),
            self.docker,
            user=user,
            seccomp_profile=self.seccomp_file_for(spec),
        )

    def spawn(self, spec: RunSpec) -> ProcessHandle:
        lease = lease_uid(spec.marker)
        try:
            env_file = self.env_file_for(spec)
            write_env_file(spec, env_file)
            profile = self.seccomp_file_for(spec)
            profile.write_text(json.dumps(docker_profile()))
            if lease.private:
                rw = [*spec.rw_paths, spec.cwd, *([spec.home] if spec.home else [])]
                skip = [env_file, profile, *([spec.log_path] if spec.log_path else [])]
                chown_tree([Path(p) for p in rw], lease.uid, lease.gid, skip=skip)
            argv = self.argv_for(spec, (lease.uid, lease.gid))
            # The docker client itself gets a fixed environment, never the user's.
            client_env = {k: v for k, v in os.environ.items() if k in _CLIENT_ENV}
            popen = popen_in_new_session(argv, client_env, None, spec)
        except BaseException:
            lease.release()
            raise
        return DockerHandle(popen, spec, self.docker, lease)


_CLIENT_ENV: Sequence[str] = ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CONTEXT")
