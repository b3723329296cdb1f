"""Issue 14 §1, the policy pieces without a sandbox: env rules, seccomp program, limits."""

from __future__ import annotations

import json
import resource
import struct
from pathlib import Path

import pytest

from loom.agent.raynode_spec import RayNodeSpec
from loom.agent.runtimes.limits import ResourceLimits, confine, disk_usage
from loom.agent.runtimes.seccomp import (
    ARCHES,
    RET_ALLOW,
    RET_ERRNO,
    build_filter,
    denied_names,
    docker_profile,
)
from loom.core.spec import (
    MAX_ENV_TOTAL,
    MAX_ENV_VALUE,
    MAX_ENV_VARS,
    SpecError,
    parse_spec,
)
from loom.protocol.messages import MAX_FRAME_BYTES

HOOKS = [
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "ld_audit",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONHOME",
    "PYTHONUSERBASE",
    "PYTHONWARNINGS",
    "BASH_ENV",
    "ENV",
    "PERL5OPT",
    "NODE_OPTIONS",
    "GCONV_PATH",
    "GLIBC_TUNABLES",
    "RAY_ADDRESS",
    "RAY_enable_metrics_collection",
    "LOOM_SANDBOX",
    "HOME",
    "PATH",
    "TMPDIR",
    "CUDA_VISIBLE_DEVICES",
]


@pytest.mark.parametrize("name", HOOKS)
def test_loader_and_interpreter_hooks_refused_at_validation(name: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({"env": {name: "/tmp/evil.so"}})
    assert name in str(err.value)  # the error names the variable
    with pytest.raises(ValueError, match=name):  # and the agent refuses it again
        RayNodeSpec("c1", "m1", "head", "t" * 32, Path("/x"), env={name: "x"})


def test_ordinary_env_is_accepted() -> None:
    spec = parse_spec({"env": {"WANDB_MODE": "offline", "HF_HOME": "/work/hf", "N": 3}})
    assert spec.env == {"WANDB_MODE": "offline", "HF_HOME": "/work/hf", "N": "3"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({f"V{i}": "x" for i in range(MAX_ENV_VARS + 1)}, "at most"),
        ({"BIG": "x" * (MAX_ENV_VALUE + 1)}, "longer than"),
        ({"N" * 129: "x"}, "invalid variable name"),
        ({"A-B": "x"}, "invalid variable name"),
        ({"NUL": "a\0b"}, "NUL"),
        ({f"V{i}": "é" * (MAX_ENV_VALUE // 2) for i in range(20)}, "in total"),
    ],
)
def test_env_sizes_are_bounded(env: dict[str, str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec({"env": env})


def test_largest_env_fits_a_member_start_frame() -> None:
    """The worst env the rules allow, JSON-escaped as on the wire, is far below 1 MiB."""
    per = MAX_ENV_TOTAL // MAX_ENV_VARS - 8
    env = {f"V{i:03d}": "\x01" * per for i in range(MAX_ENV_VARS)}
    spec = parse_spec({"env": env})
    frame = json.dumps({"type": "member.start", "args": {"env": spec.env, "token": "t" * 256}})
    assert len(frame.encode()) < MAX_FRAME_BYTES // 2


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_seccomp_program_shape(arch: str) -> None:
    prog = build_filter(ARCHES[arch])
    assert len(prog) % 8 == 0 and len(prog) // 8 < 256
    ins = [struct.unpack("=HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]
    # first: load the architecture and refuse any other
    assert ins[0] == (0x20, 0, 0, 4)
    assert ins[1][0] == 0x15 and ins[1][3] == ARCHES[arch].audit
    rets = {k for code, _, _, k in ins if code == 0x06}
    assert rets == {RET_ALLOW, RET_ERRNO | 1, RET_ERRNO | 38}
    for name in ("ptrace", "mount", "keyctl", "bpf", "setns", "kexec_load", "userfaultfd"):
        assert name in denied_names(ARCHES[arch])


def test_docker_profile_matches_the_filter() -> None:
    profile = docker_profile(ARCHES["x86_64"])
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    rules = profile["syscalls"]
    assert isinstance(rules, list)
    names = {n for r in rules for n in r["names"]}
    assert set(denied_names(ARCHES["x86_64"])) | {"clone", "clone3", "unshare"} <= names


def test_cgroup2_limits_written(tmp_path: Path) -> None:
    """The v2 layout, on a stand-in tree (this machine has cgroup v1 only)."""
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    (tmp_path / "loom").mkdir()
    (tmp_path / "loom" / "cgroup.subtree_control").write_text("")
    (tmp_path / "loom" / "m1").mkdir()
    (tmp_path / "loom" / "m1" / "memory.swap.max").write_text("max")
    limits = ResourceLimits(cpus=1.5, memory_bytes=1 << 30, pids=256, disk_bytes=1 << 20)
    conf = confine("m1", limits, private_uid=True, root=tmp_path, kind="cgroup2")
    d = tmp_path / "loom" / "m1"
    assert conf.dirs == [d]
    assert (d / "memory.max").read_text() == str(1 << 30)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "pids.max").read_text() == "256"
    assert (d / "cpu.max").read_text() == "150000 100000"
    assert "+memory" in (tmp_path / "cgroup.subtree_control").read_text()
    assert dict(conf.rlimits)[resource.RLIMIT_NPROC] == 256
    assert dict(conf.rlimits)[resource.RLIMIT_FSIZE] == 1 << 20


def test_rlimit_fallback() -> None:
    limits = ResourceLimits(memory_bytes=1 << 30, pids=100)
    conf = confine("m1", limits, private_uid=False, kind="rlimit")
    got = dict(conf.rlimits)
    assert got[resource.RLIMIT_AS] == 1 << 30 and got[resource.RLIMIT_CORE] == 0
    assert resource.RLIMIT_NPROC not in got  # the agent's own uid: it would count the agent


def test_disk_usage(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * (1 << 20))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"y" * (1 << 20))
    assert disk_usage([tmp_path]) >= 2 << 20
