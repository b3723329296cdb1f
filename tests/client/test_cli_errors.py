"""Every command with bad values: one clear line (or a JSON object), the documented exit
code, never a traceback. Run in-process through the same runner as the `loom` script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loom.client.cli.cluster import without_traceback
from loom.client.cli.runner import run
from loom.entry import full_app
from support.servers import free_port

DEAD = "DEAD"  # replaced by a closed local port: the coordinator is unreachable

BAD: list[tuple[list[str], int, str]] = [
    (["nodes", "--state", "availble"], 2, "not a node state"),
    (["--coordinator", "127.0.0.1:8700", "nodes"], 2, "give it with its scheme"),
    (["--coordinator", "ftp://x", "cluster", "list"], 2, "not an http(s) URL"),
    (["nodes", "--bogus"], 2, "No such option: --bogus"),
    (["cluster", "up", "--nodes", "x"], 2, "--nodes"),
    (["cluster", "up", "--nodes", "3", "--cpus", "1", "--gpu", "rtx4090"], 2, "not both"),
    (["cluster", "up", "nosuch.yaml"], 2, "cannot read nosuch.yaml"),
    (["cluster", "up", "--duration", "forever"], 2, "invalid duration"),
    (["cluster", "up", "--env", "NOEQUALS"], 2, "KEY=VALUE"),
    (["cluster", "up", "--nodes", "0"], 2, "nodes"),
    (["cluster", "status"], 2, "Missing argument"),
    (["cluster", "exec", "demo"], 2, "command to run"),
    (["cluster", "exec", "demo", "--node", " ", "--", "hostname"], 2, "--node"),
    (["cluster", "status", "demo", "--watch", "--json"], 2, "do not go together"),
    (["credits", "deposit", "-5"], 2, "No such option"),
    (["credits", "deposit", "abc"], 2, "not a number"),
    (["credits", "history", "--limit", "0"], 2, "--limit"),
    (["payout", "request", "1.0000001"], 2, "6 decimal places"),
    (["offers", "gpu=rtx4090 gpus>=x"], 2, "expected a whole number"),
    (["offers", "--limit", "0"], 2, "--limit"),
    (["quote", "nosuch.yaml"], 2, "cannot read"),
    (["job", "logs", "demo", "", "--follow"], 2, "not a job id"),
    (["job", "stop", "demo", " "], 2, "not a job id"),
    (["job", "submit", "demo"], 2, "Missing argument"),
    (["job", "submit", "demo", "--working-dir", "/nonexistent", "--", "python"], 2, "directory"),
    (["evidence", "verify", "/nonexistent"], 2, "cannot read"),
    (["key", "new", "--name", "bad/name"], 2, "invalid key name"),
    (["--key", "nobody", "nodes"], 2, "loom key new"),
    (["config", "set", "coordinator", "127.0.0.1:8700"], 2, "scheme"),
    (["config", "set", "colour", "x"], 2, "unknown setting"),
    (["config", "set", "region", "mars"], 2, "invalid region"),
    (["config", "set", "runtime", "nosuch"], 2, "unknown runtime"),
    (["up", "--agents", "0"], 2, "--agents"),
    (["worker", "start", "--runtime", "nosuch"], 2, "unknown runtime"),
    (["worker", "start", "--coordinator", "ftp://x"], 2, "http"),
    (["worker", "start", "--region", "mars"], 2, "invalid region"),
    (["worker", "start", "--price", "abc"], 2, "not a number"),
    (["worker", "start", "--inventory", "/nonexistent"], 2, "/nonexistent"),
    (["worker", "status", "--name", "nosuch"], 2, "no node 'nosuch'"),
    (["worker", "status"], 2, "loom worker start"),
    (["coordinator", "serve", "--db", "mysql://x"], 2, "unsupported database URL"),
    (["cluster", "forward", "demo", "--dashboard", "99999"], 2, "65535"),
    (["ledger", "verify", "--bogus"], 2, "No such option"),
    (["--coordinator", DEAD, "cluster", "list"], 3, "cannot reach the coordinator"),
    (["--coordinator", DEAD, "cluster", "down", "x"], 3, "cannot reach"),
    (["--coordinator", DEAD, "cluster", "up", "--nodes", "1", "--yes"], 3, "cannot reach"),
    (["--coordinator", DEAD, "job", "list", "demo"], 3, "cannot reach"),
    (["--coordinator", DEAD, "earnings"], 3, "cannot reach"),
    (["--coordinator", DEAD, "nodes", "--mine"], 3, "cannot reach"),
]


@pytest.fixture
def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run(full_app(), args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_values_exit_with_one_line_and_no_traceback(
    loom_home: Path, dead_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    problems = []
    for args, want, needle in BAD:
        argv = [dead_url if a == DEAD else a for a in args]
        code, out, err = _run(argv, capsys)
        text = out + err
        if code != want or needle not in err or "Traceback" in text or "internal error" in text:
            problems.append(f"{argv}: exit {code} (want {want}), stderr {err.strip()[:300]!r}")
        first = err.strip().splitlines()[0] if err.strip() else ""
        if not first.startswith("error: ") and "--json" not in argv:
            problems.append(f"{argv}: stderr does not start with 'error: ': {err[:200]!r}")
    assert not problems, "\n".join(problems)


def test_json_errors_are_one_object_with_code_message_field(
    loom_home: Path, dead_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for args, want, _needle in BAD:
        argv = [dead_url if a == DEAD else a for a in args] + ["--json"]
        if "--" in argv or argv[0] in ("up", "worker", "coordinator", "config", "key"):
            continue  # `--json` after `--` is the entrypoint's; these take no --json
        code, out, err = _run(argv, capsys)
        if code == 2 and "No such option: --json" in err:
            continue
        assert code == want, (argv, err)
        body = json.loads(err)
        assert set(body) == {"code", "message", "field"}, (argv, body)
        assert body["message"] and "Traceback" not in out + err
    code, _out, err = _run(["--coordinator", "127.0.0.1:8700", "nodes", "--json"], capsys)
    assert code == 2
    assert json.loads(err) == {
        "code": "bad_input",
        "message": json.loads(err)["message"],
        "field": "coordinator",
    }
    code, _out, err = _run(["nodes", "--json", "--bogus"], capsys)
    assert code == 2 and json.loads(err)["code"] == "usage"


def test_caret_lines_up_under_the_bad_token(
    loom_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _out, err = _run(["offers", "gpu=rtx4090 gpus>=x"], capsys)
    assert code == 2
    first, second = err.splitlines()[:2]
    assert first.startswith("error: gpu=rtx4090 gpus>=x")
    assert first.index("x", len("error: gpu=rtx4090")) == second.index("^")


def test_help_is_plain_and_keeps_brackets(
    loom_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _err = _run(["offers", "--help"], capsys)
    assert code == 0
    assert "[eu-west,us-east]" in out and "<bool>" not in out and "╭" not in out
    code, out, _err = _run(["cluster", "up", "--help"], capsys)
    assert code == 0 and "--dry-run" in out and "--yes" in out and "<bool>" not in out


def test_version_completion_and_config(
    loom_home: Path, dead_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _err = _run(["--version"], capsys)
    assert code == 0 and out.startswith("loom 0.")
    code, out, _err = _run(["--show-completion", "bash"], capsys)
    assert code == 0 and "_loom_completion" in out
    assert _run(["config", "set", "coordinator", dead_url + "/"], capsys)[0] == 0
    assert _run(["config", "set", "region", "us-east"], capsys)[0] == 0
    code, out, _err = _run(["config", "show", "--json"], capsys)
    rows = {r["key"]: r for r in json.loads(out)["settings"]}
    assert rows["coordinator"]["value"] == dead_url
    assert rows["coordinator"]["source"] == "config file"
    assert rows["region"]["value"] == "us-east" and rows["key"]["source"] == "default"
    assert (loom_home / "config.toml").read_text().startswith(f'coordinator = "{dead_url}')
    # The stored URL is used by every command (nothing listens there: exit 3, named).
    code, _out, err = _run(["nodes"], capsys)
    assert code == 3 and dead_url in err
    assert _run(["config", "unset", "coordinator"], capsys)[0] == 0
    (loom_home / "config.toml").write_text("coordinator = [\n")
    code, _out, err = _run(["nodes"], capsys)
    assert code == 2 and "config.toml" in err


def test_cluster_reasons_lose_quoted_tracebacks() -> None:
    reason = (
        "a worker failed to start (Ray node exited with code 1:\n"
        "  INFO node.py:438 -- Failed to get node info\n"
        "  Traceback (most recent call last):\n"
        '    File "/venv/bin/ray", line 6, in <module>\n'
        "      sys.exit(main())\n"
        "  RuntimeError: GCS unreachable) and no other node fits the spec"
    )
    text = without_traceback(reason)
    assert "Traceback" not in text and 'File "' not in text
    assert "Failed to get node info" in text and "no other node fits the spec" in text
