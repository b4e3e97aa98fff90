"""Containment attacks, each through the real helpers and real processes: a daemon that
outlives training, a train.py rewriting the venv or uv's cache, one memorising the evaluation rows,
symbolic links planted where the helpers write, a module shadowing the standard library in the
referee, and training past the budget (longer, or with extra processes).

Same set-up as test_helpers_cli.py (fake trainers of tests/fixtures/fake_train, prepare_standin.py
as the pinned prepare.py). Where the kernel forbids bubblewrap's namespaces the sandboxed tests skip,
except in CI (AUTORESEARCH_REQUIRE_SANDBOX=1), where that is a failure.
"""

import hashlib
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_helpers_cli import fake, ok, pid_gone, refused, repo  # noqa: F401  (repo is a fixture)


def sandboxed_session(repo, tag, *extra):  # noqa: F811
    ok(repo.run("setup", "--tag", tag, "--noise-runs", "0", *extra), lines=None)
    state = json.loads((repo.path / "runs" / "session.json").read_text())
    if state["sandbox"] == "unavailable":
        if os.environ.get("AUTORESEARCH_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"no sandbox here: {state['sandbox_problem']} (AUTORESEARCH_REQUIRE_SANDBOX=1)")
        pytest.skip(f"the kernel forbids the sandbox here: {state['sandbox_problem']}")
    return state


def run_dir(repo, number):
    (folder,) = (repo.path / "runs").glob(f"{number}-*")
    return folder


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def processes_with(marker):
    """Live pids on this machine whose command line contains `marker`."""
    found = []
    for name in os.listdir("/proc"):
        try:
            command = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in command and not pid_gone(int(name)):
            found.append(int(name))
    return found


# ---------------------------------------------------------------------------
# A daemon that outlives training


def test_a_setsid_daemon_dies_with_the_run_and_writes_nothing_after_it(repo):  # noqa: F811
    sandboxed_session(repo, "daemon")
    line = ok(repo.experiment("leave a daemon", train=fake("daemon.py")))
    assert "baseline" in line
    folder = run_dir(repo, "0001")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["val_bpb"] == 1.0 and summary["protections"]["pid_namespace"] is True
    log = folder / "out" / "daemon.log"
    size = log.stat().st_size
    assert size > 0  # it ran while training did
    time.sleep(1.0)
    assert log.stat().st_size == size, "the daemon kept writing after the run"
    assert json.loads((folder / "summary.json").read_text()) == summary
    assert processes_with("daemon.py") == []


def test_without_the_sandbox_the_daemon_survives(repo):  # noqa: F811
    """The control: the same train.py unsandboxed leaves its daemon running, and it overwrites the summary."""
    ok(repo.run("setup", "--tag", "daemon", "--noise-runs", "0", "--no-sandbox"), lines=None)
    try:
        ok(repo.experiment("leave a daemon", train=fake("daemon.py")))
        folder = run_dir(repo, "0001")
        time.sleep(0.5)
        assert processes_with("daemon.py"), "the control expected a surviving daemon"
        # it rewrites the file every 50 ms (truncate, then write): read it between two rewrites
        texts = []
        for _ in range(5):
            texts.append((folder / "summary.json").read_text())
            time.sleep(0.01)
        assert '{"status": "ok", "val_bpb": 0.1}\n' in texts, texts
    finally:
        for pid in processes_with("daemon.py"):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------
# The venv and uv's cache


def uv_cache_file():
    """A file in uv's cache (the venv's files are hard links into it), or None."""
    try:
        folder = subprocess.run(["uv", "cache", "dir"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if name.endswith(".py") and path.stat().st_size > 0:
                return path
    return None


def test_training_cannot_rewrite_the_venv_or_the_uv_cache(repo):  # noqa: F811
    sandboxed_session(repo, "venv")
    import numpy
    import torch
    targets = [Path(numpy.__file__), Path(torch.__file__)]
    cached = uv_cache_file()
    targets += [cached] if cached else []
    before = {path: sha256(path) for path in targets}
    ok(repo.experiment("rewrite torch", train=fake("rewrite_env.py", *targets)))
    log = (run_dir(repo, "0001") / "run.log").read_text()
    for path in targets:
        assert f"wrote {path}" not in log and f"blocked {path}: " in log, log
    assert "blocked " + str(targets[0]) + ": Read-only file system" in log
    assert {path: sha256(path) for path in targets} == before


# ---------------------------------------------------------------------------
# Memorising the evaluation rows


def test_a_memorising_train_py_reads_no_evaluation_data_anywhere(repo, tmp_path):  # noqa: F811
    eval_folder = repo.cache / "prepared" / "eval"
    eval_folder.mkdir()
    for name in ("val_rows.npy", "test_rows.npy"):
        (eval_folder / name).write_bytes(b"held-out rows " * 100)
    copies = tmp_path / "elsewhere"  # copies on the machine: /tmp, another checkout's runs/
    (copies / "other-checkout" / "runs" / "0001-abcdef1").mkdir(parents=True)
    (copies / "val_rows.npy").write_bytes(b"a copy in /tmp")
    (copies / "other-checkout" / "runs" / "0001-abcdef1" / "test_rows.npy").write_bytes(b"a copy in runs/")
    targets = [eval_folder / "val_rows.npy", eval_folder / "test_rows.npy", copies / "val_rows.npy",
               copies / "other-checkout" / "runs" / "0001-abcdef1" / "test_rows.npy"]
    repo.git("commit", "-q", "--allow-empty", "-m", "nothing")
    state = sandboxed_session(repo, "memorise")
    assert "eval/val_rows.npy" in state["data_pins"]

    line = ok(repo.experiment("memorise the eval rows", train=fake("memorise.py", *targets)))
    log = (run_dir(repo, "0001") / "run.log").read_text()
    assert "read " not in log and all(f"blocked {path}: No such file or directory" in log for path in targets), log
    summary = repo.summary("0001")
    assert summary["val_bpb"] == 1.0 and summary["protections"]["eval_hidden"] is True and summary["verified"] is False
    assert "val_bpb 1.000000" in line  # (verified stays False here only because the fake is a --train-command)


def test_a_memoriser_that_claims_its_stolen_score_is_invalid(repo):  # noqa: F811
    """Where it could read the rows (no sandbox), its claimed number is not the referee's: invalid."""
    eval_folder = repo.cache / "prepared" / "eval"
    eval_folder.mkdir()
    (eval_folder / "val_rows.npy").write_bytes(b"held-out rows")
    ok(repo.run("setup", "--tag", "memorise", "--noise-runs", "0", "--no-sandbox"), lines=None)
    result = repo.experiment("memorise", train=fake("memorise.py", eval_folder / "val_rows.npy"))
    assert result.returncode == 1 and "invalid (referee): train.py printed val_bpb 0.500000" in result.stdout
    assert "sandbox off" in ok(repo.run("status"), lines=None)


# ---------------------------------------------------------------------------
# Symbolic links where the helpers write


@pytest.mark.parametrize("sandbox", [True, False])
def test_a_planted_link_never_makes_the_helper_overwrite_a_file(repo, tmp_path, sandbox):  # noqa: F811
    victim = tmp_path / "victim.txt"  # say, .claude/hooks/guard_tool_use.py
    victim.write_text("precious\n")
    if sandbox:
        sandboxed_session(repo, "links")
    else:
        ok(repo.run("setup", "--tag", "links", "--noise-runs", "0", "--no-sandbox"), lines=None)
    ok(repo.experiment("plant links", train=fake("plant_link.py", victim)))
    folder = run_dir(repo, "0001")
    log = (folder / "run.log").read_text()
    assert ("blocked referee-val.log: Read-only file system" if sandbox else "planted referee-val.log") in log, log
    assert victim.read_text() == "precious\n"
    assert not (folder / "referee-val.log").is_symlink() and "val_bpb:" in (folder / "referee-val.log").read_text()
    assert not (folder / "summary.json").is_symlink() and repo.summary("0001")["val_bpb"] == 1.0


def test_a_linked_pending_file_is_refused_not_followed(repo, tmp_path):  # noqa: F811
    ok(repo.run("setup", "--tag", "pending", "--noise-runs", "0"), lines=None)
    fake_pending = tmp_path / "pending.json"
    fake_pending.write_text(json.dumps({"id": "0009", "state": "finished"}))
    (repo.path / "runs" / "pending.json").symlink_to(fake_pending)
    refused(repo.run("decide", "keep"), "pending.json is a symbolic link")


# ---------------------------------------------------------------------------
# The referee imports nothing from the repository


@pytest.mark.parametrize("module", ["bisect", "json"])
def test_an_untracked_module_at_the_root_never_runs_in_the_referee(repo, tmp_path, module):  # noqa: F811
    marker = tmp_path / f"{module}-imported"
    # Without the sandbox, so that the marker could be written if the module ran: only `python -I`
    # on a copy in an empty folder keeps it out.
    ok(repo.run("setup", "--tag", "shadow", "--noise-runs", "0", "--no-sandbox"), lines=None)
    (repo.path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n"
                                            "print('val_bpb: 0.000001')\n")
    line = ok(repo.experiment("shadow the standard library", 1.0))
    assert "val_bpb 1.000000" in line and not marker.exists()
    assert repo.summary("0001")["referee"] == "verified"


# ---------------------------------------------------------------------------
# The budget, measured by the helper


def budget_session(repo, profile="cpu", budget=2, train_tokens=None):  # noqa: F811
    """A session whose noise runs (burn.py 1.0: exactly the time budget) measured the limit: on a
    time budget the allowance, on a token budget (`train_tokens`) the baseline's compute."""
    manifest_path = repo.cache / "prepared" / "prepared.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(profile=profile, time_budget=budget, train_tokens=train_tokens)
    manifest_path.write_text(json.dumps(manifest))
    ok(repo.run("setup", "--tag", "budget", "--noise-runs", "2", train=fake("burn.py", 1.0)), lines=None)
    session = json.loads((repo.path / "runs" / "session.json").read_text())
    if train_tokens:
        # (in the sandbox the helper's last look at /proc, every 0.25 s, is what counts: bwrap's init
        # dies before its children's times reach wait4, so up to one interval goes uncounted)
        assert len(session["baseline_compute_s"]) == 2 and min(session["baseline_compute_s"]) > budget - 0.5
    else:
        assert len(session["overheads_s"]) == 2 and session["allowance_s"] > 0
    return session


def limit_of(session):
    """The compute a run of the session may use, as the helper computes it."""
    if session.get("train_tokens"):
        return 1.5 * max(session["baseline_compute_s"])  # runner.TOKEN_CEILING
    return session["time_budget"] + session["allowance_s"]


def past_the_limit(session):
    """burn.py's factor for a run that would go on well past the limit (on a slow machine the
    start-up measured, and so the limit, can exceed the budget itself several times)."""
    limit = limit_of(session)
    return round((limit + max(1.0, 0.3 * limit)) / session["time_budget"], 2)


@pytest.mark.parametrize("train_tokens", [None, 4096], ids=["time-budget", "token-budget"])
def test_training_past_the_budget_is_stopped_and_invalid(repo, train_tokens):  # noqa: F811
    session = budget_session(repo, train_tokens=train_tokens)
    limit = limit_of(session)
    ok(repo.experiment("baseline", train=fake("burn.py", 1.0)))
    ok(repo.run("decide", "keep"))
    result = repo.experiment("train past the limit", train=fake("burn.py", past_the_limit(session)))
    assert result.returncode == 1 and "invalid (over_budget): trained past the budget" in result.stdout, result.stdout
    summary = repo.summary("0004")
    if train_tokens:  # the verdict says what the limit was made of
        assert f"(1.5 x the {max(session['baseline_compute_s']):.1f} s the baseline used at setup)" \
            in summary["triage"]["detail"], summary["triage"]
    assert summary["status"] == "invalid" and summary["clock"] == "cpu_time"
    assert limit - 0.01 <= summary["compute_seconds"] < limit + 1.0  # stopped soon after the limit
    assert summary["metrics"] == {}  # the printed "training_seconds: 1.5" counts for nothing
    assert "recorded as invalid" in ok(repo.run("decide", "keep"))
    assert repo.rows()[-1][1:4] == ["0.000000", "0.0", "invalid"]


def test_extra_worker_processes_buy_no_compute(repo):  # noqa: F811
    session = budget_session(repo)
    workers = math.ceil(past_the_limit(session))  # together they burn past the limit; alone, the budget
    result = repo.experiment("more workers", train=fake("burn.py", 1.0, "workers", workers))
    assert result.returncode == 1 and "invalid (over_budget)" in result.stdout, result.stdout
    assert repo.summary("0003")["compute_seconds"] >= limit_of(session)


def test_on_a_gpu_profile_the_budget_is_wall_time(repo):  # noqa: F811
    session = budget_session(repo, profile="gpu")
    result = repo.experiment("sleep past the limit", train=fake("burn.py", past_the_limit(session)))
    assert result.returncode == 1 and "invalid (over_budget)" in result.stdout and "wall time" in result.stdout
    assert repo.summary("0003")["clock"] == "wall_time"


def test_a_cache_reached_through_a_link_is_visible_and_its_eval_data_hidden(repo, tmp_path):  # noqa: F811
    real = tmp_path / "disk" / "prepared"
    real.parent.mkdir()
    (repo.cache / "prepared").rename(real)
    (repo.cache / "prepared").symlink_to(real)
    (real / "eval").mkdir()
    (real / "eval" / "val_rows.npy").write_bytes(b"held-out rows")
    sandboxed_session(repo, "linked")
    targets = [repo.cache / "prepared" / "prepared.json", repo.cache / "prepared" / "eval" / "val_rows.npy",
               real / "eval" / "val_rows.npy"]
    repo.experiment("read through the link", train=fake("memorise.py", *targets))  # (it "stole" the manifest)
    log = (run_dir(repo, "0001") / "run.log").read_text()
    assert f"read {targets[0]}" in log  # the manifest, which training may read
    assert f"blocked {targets[1]}: No such file or directory" in log and f"blocked {targets[2]}: " in log, log
