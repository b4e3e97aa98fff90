"""Lowered protections are recorded and visible: --no-referee results are self-reported
and never verified, setup refuses to replace a protected session by a weaker one unless a human
says so, forced keeps and the flags show in summary.json and status, and the pins cover the hooks,
the settings and the whole prepared data.

Same set-up as test_helpers_cli.py (fake trainers, prepare_standin.py as the pinned prepare.py).
"""

import json

import pytest

from test_helpers_cli import fake, ok, refused, repo  # noqa: F401  (repo is a fixture)


def session_json(repo):
    return json.loads((repo.path / "runs" / "session.json").read_text())


def test_setup_will_not_silently_replace_a_refereed_session_by_one_without(repo):  # noqa: F811
    ok(repo.run("setup", "--tag", "first", "--noise-runs", "0"), lines=None)
    refused(repo.run("setup", "--tag", "second", "--noise-runs", "0", "--no-referee"),
            "session first runs with the referee on", "--new-session")
    refused(repo.run("setup", "--tag", "second", "--noise-runs", "0", "--no-sandbox", "--no-referee"),
            "sandbox and referee", "--no-sandbox --no-referee")
    assert session_json(repo)["tag"] == "first" and repo.git("branch", "--show-current") == "autoresearch/first"
    ok(repo.run("setup", "--tag", "second", "--noise-runs", "0", "--no-referee", "--new-session"), lines=None)
    assert session_json(repo)["referee"] == "off" and session_json(repo)["lowered"] == ["--no-referee"]
    refused(repo.run("setup", "--measure-noise", "--noise-runs", "1", "--no-sandbox"), "--measure-noise")


def test_a_no_referee_result_is_self_reported_and_never_verified(repo):  # noqa: F811
    ok(repo.run("setup", "--tag", "off", "--noise-runs", "0", "--no-referee"), lines=None)
    line = ok(repo.experiment("baseline", 1.0))
    assert "baseline; self-reported (referee off) (next: decide.py keep)" in line
    summary = repo.summary("0001")
    assert summary["referee"] == "off" and summary["verified"] is False and summary["self_reported"] is True
    assert summary["protections"]["referee"] == "off" and summary["protections"]["eval_hidden"] is False
    ok(repo.run("decide", "keep"))
    status = ok(repo.run("status"), lines=None)
    assert "last experiment: self-reported (referee off)" in status and "set up with --no-referee" in status
    assert "protections off: self-reported (referee off); set up with --no-referee" in ok(
        repo.run("status", "--report"), lines=None)


def test_a_refereed_sandboxed_result_says_nothing_was_off(repo):  # noqa: F811
    ok(repo.run("setup", "--tag", "on", "--noise-runs", "0"), lines=None)
    if session_json(repo)["sandbox"] != "on":
        pytest.skip("no sandbox here")
    line = ok(repo.experiment("baseline", 1.0))
    assert line.rstrip().endswith(": baseline (next: decide.py keep)")
    summary = repo.summary("0001")
    assert summary["protections"] == {"sandbox": "on", "referee": "on", "eval_hidden": True, "pid_namespace": True,
                                      "compute_measured": "cpu_time", "train_command": "custom", "shared": []}
    assert summary["verified"] is False  # a --train-command (the fake) is never verified
    assert "last experiment not verified" in ok(repo.run("status"), lines=None)


def test_a_forced_keep_is_recorded_in_the_summary_and_status(repo):  # noqa: F811
    ok(repo.run("setup", "--tag", "forced", "--noise-runs", "0"), lines=None)
    ok(repo.experiment("baseline", 1.0))
    ok(repo.run("decide", "keep"))
    ok(repo.experiment("worse", 1.2))
    ok(repo.run("decide", "keep", "--force"))
    assert repo.summary("0002")["decision"]["forced"] is True
    assert "forced keeps 1" in ok(repo.run("status"), lines=None)


def test_a_changed_hook_or_settings_file_stops_the_next_experiment(repo):  # noqa: F811
    hooks = repo.path / ".claude" / "hooks"
    hooks.mkdir(parents=True)
    (hooks / "guard_tool_use.py").write_text("# the guard\n")
    (repo.path / ".claude" / "settings.json").write_text("{}\n")
    repo.git("add", "-f", ".claude/hooks/guard_tool_use.py", ".claude/settings.json")
    repo.git("commit", "-q", "-m", "hooks")
    ok(repo.run("setup", "--tag", "hooks", "--noise-runs", "0"), lines=None)
    assert set(session_json(repo)["protocol_sha256"]) == {".claude/settings.json", ".claude/hooks/guard_tool_use.py"}
    (repo.path / ".claude" / "settings.json").write_text('{"disableAllHooks": true}\n')
    repo.git("commit", "-q", "-am", "no hooks")
    refused(repo.experiment("unguarded"), ".claude/settings.json no longer matches the hash pinned at setup")
    repo.git("reset", "-q", "--hard", "HEAD~1")
    (hooks / "allow_all.py").write_text("# a new hook\n")
    refused(repo.experiment("unguarded"), ".claude/hooks/allow_all.py no longer matches")


def test_a_changed_manifest_or_train_cache_stops_the_next_experiment(repo):  # noqa: F811
    prepared = repo.cache / "prepared"
    (prepared / "train_tokens.bin").write_bytes(b"\x01\x02" * 1000)
    ok(repo.run("setup", "--tag", "data", "--noise-runs", "0"), lines=None)
    assert {"prepared.json", "train_tokens.bin"} <= set(session_json(repo)["data_pins"])
    manifest = json.loads((prepared / "prepared.json").read_text())
    (prepared / "prepared.json").write_text(json.dumps(dict(manifest, time_budget=600)))
    refused(repo.experiment("a longer budget"), "prepared data's prepared.json no longer matches")
    (prepared / "prepared.json").write_text(json.dumps(manifest))
    (prepared / "train_tokens.bin").write_bytes(b"\x02\x01" * 1000)
    refused(repo.experiment("other train tokens"), "prepared data's train_tokens.bin no longer matches")


def test_a_shared_path_is_writable_and_recorded(repo, tmp_path):  # noqa: F811
    shared = tmp_path / "shared"
    shared.mkdir()
    ok(repo.run("setup", "--tag", "share", "--noise-runs", "0"), lines=None)
    if session_json(repo)["sandbox"] != "on":
        pytest.skip(f"no sandbox here: {session_json(repo)['sandbox_problem']}")
    line = ok(repo.run("experiment", "write the shared folder", train=fake("escape.py", "write", shared / "trace"),
                       env={"AUTORESEARCH_SANDBOX_SHARE": str(shared)}))
    assert (shared / "trace").read_text() == "escaped\n" and "sandbox shares paths" in line
    assert repo.summary("0001")["protections"]["shared"] == [str(shared)]
