"""`loom up --replicas`, `loom coordinator serve --bus` and `loom worker start --coordinator
URL1,URL2`: bad combinations exit 2 with one line saying what to change (a wrong bus
credential too, without the secret); agents are spread over the replicas with every URL to
fail over to. tests/integration/test_up_replicas_e2e.py runs `loom up --replicas` itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from loom.client.cli.runner import run
from loom.entry import full_app
from loom.launcher import LocalNetwork
from support.nats import NatsServer


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = run(full_app(), args)
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["up", "--replicas", "3"], "PostgreSQL"),
        (["up", "--replicas", "3", "--db", "sqlite:///x.db"], "PostgreSQL"),
        (["up", "--replicas", "12", "--db", "postgresql://u@h/d"], "between 1 and 9"),
        (["coordinator", "serve", "--bus", "nats://127.0.0.1:4222"], "--db postgresql"),
        (["coordinator", "serve", "--bus", "http://x:1", "--db", "postgresql://u@h/d"], "nats://"),
        (
            [
                "coordinator",
                "serve",
                "--bus",
                "nats://h:1",
                "--db",
                "postgresql://u@h/d",
                "--replica-id",
                "a.b",
            ],
            "--replica-id",
        ),
        (["worker", "start", "--coordinator", "http://a:1,ftp://b:2"], "http(s)"),
        (["worker", "start", "--coordinator", " , "], "at least one"),
    ],
)
def test_bad_replica_options_exit_2_with_a_reason(
    loom_home: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    code, err = _run(args, capsys)
    assert code == 2, err
    assert needle in err and "Traceback" not in err, err


def test_agents_are_spread_over_the_replicas(tmp_path: Path) -> None:
    net = LocalNetwork(home=tmp_path, port=8700, agents=4, runtime="process", replicas=3)
    net.replica_ports = [8700, 8701, 8702]
    firsts = [net.agent_coordinators(i).split(",")[0] for i in range(4)]
    assert firsts == [
        "http://127.0.0.1:8700", "http://127.0.0.1:8701", "http://127.0.0.1:8702",
        "http://127.0.0.1:8700",
    ]  # fmt: skip
    assert all(len(net.agent_coordinators(i).split(",")) == 3 for i in range(4))
    single = LocalNetwork(home=tmp_path, port=8700, agents=1, runtime="process")
    assert single.agent_coordinators(0) == "http://127.0.0.1:8700"


def test_up_with_a_wrong_bus_credential_says_so_in_one_line(
    loom_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = NatsServer("--user", "loom", "--pass", "r1ght-pass")
    try:
        args = ["up", "--replicas", "2", "--db", "postgresql://u@h/d"]
        code, err = _run([*args, "--bus", server.url("loom:wr0ng-pass")], capsys)
        assert code == 2, err
        assert "refused our credentials" in err and "nats://loom:***@127.0.0.1" in err, err
        assert "wr0ng-pass" not in err and "Traceback" not in err
        code, err = _run([*args, "--bus", server.url()], capsys)
        assert code == 2 and "requires credentials" in err, err
    finally:
        server.stop()
    code, err = _run([*args, "--bus", "nats://127.0.0.1:1"], capsys)
    assert code == 3 and "cannot reach" in err, err
