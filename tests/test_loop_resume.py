"""kill -9 of the headless loop at every stage, then resume: no ledger row lost or duplicated,
the branch at the best kept commit, nothing left running.

The loop kills itself with a real SIGKILL where AUTORESEARCH_LOOP_KILL_AT=STAGE:ITERATION says,
right after recording that stage and before doing its work (at `train`, experiment.py is already
training and survives its loop, as it would a real kill). Another test kills the loop's whole
process group from outside in the middle of a training run."""

import difflib
import json
import os
import signal
import time

import pytest
from conftest import pid_gone
from loop_repo import LoopRepo, agent, check_consistent, description, ok

BASELINE_STAGES = ["commit", "train", "triage", "record", "decide", "remember", "stop-check"]
ITERATION_STAGES = ["propose", "apply", "validate"] + BASELINE_STAGES


@pytest.fixture
def repo(tmp_path):
    return LoopRepo(tmp_path / "repo")


def kill_at(repo, command, stage, iteration, env=None):
    result = repo.loop(*command, env=dict(env or {}, AUTORESEARCH_LOOP_KILL_AT=f"{stage}:{iteration}"))
    assert result.returncode == -signal.SIGKILL, (stage, iteration, result.stdout, result.stderr)
    state = repo.state()
    assert (state["stage"], state["iteration"]) == (stage, iteration)


def resume_after_every_kill(repo, proposer, env=None, iterations=(1, 2)):
    points = [("setup", 0), ("noise", 0)] + [(stage, 0) for stage in BASELINE_STAGES]
    points += [(stage, number) for number in iterations for stage in ITERATION_STAGES] + [("report", 3)]
    command = ["start", "--no-referee", "--noise-runs", "2", *proposer, "--max-experiments", "2", "--tag", "killed"]
    for stage, iteration in points:
        kill_at(repo, command, stage, iteration, env)
        command = ["resume"]
    ok(repo.loop("resume", env=env))
    assert repo.state()["stage"] == "done"
    rows = check_consistent(repo)
    assert len(rows) == 3, rows
    commits = [record["runs"][-1]["commit"][:7] for record in map(repo.record, (0, 1, 2))]
    assert commits == [row[0] for row in rows]
    return rows


def test_kill_9_at_every_stage_with_the_random_proposer(repo):
    rows = resume_after_every_kill(repo, ["--agent", "random"])
    assert "Stopped: --max-experiments 2 reached" in repo.report()
    notes = (repo.path / "notes.md").read_text()
    assert notes.count("### ANALYSIS: [loop 0001]") == 1 and notes.count("### REASONING: [loop 0002]") == 1
    assert description(rows[0]) == "baseline"


def test_kill_9_at_every_stage_with_an_agent(repo):
    rows = resume_after_every_kill(repo, ["--agent", "claude", "--agent-bin", agent("raises_lr.py")], iterations=(1,))
    assert [description(row) for row in rows[1:]] == ["matrix lr 0.03 -> 0.045", "matrix lr 0.045 -> 0.0675"]


def test_kill_9_of_the_whole_loop_mid_training_records_the_run_as_a_crash(repo, tmp_path):
    slow = tmp_path / "slow" / "seconds"  # in a folder of its own, which the training sandbox may see
    slow.parent.mkdir()
    loop = repo.spawn("start", "--no-referee", "--noise-runs", "0", "--max-experiments", "2",
                      env={"FAKE_SLOW_FILE": str(slow), "AUTORESEARCH_SANDBOX_SHARE": str(slow.parent)})
    try:
        repo.wait_for(lambda: (repo.path / "results.tsv").exists() and len(repo.rows()) == 1, what="the baseline")
        slow.write_text("60")
        # The first experiment may have read the slow file before it was written (a loaded box) and
        # ended in milliseconds: wait for a run still training a second after its pid was recorded.
        repo.wait_for(lambda: slow_run_in_flight(repo), what="a slow run training", seconds=120)
        training = repo.pending()["training_pgid"]
        killed = len(repo.rows())  # the row the killed run gets: the baseline is row 0
        os.killpg(loop.pid, signal.SIGKILL)  # the loop and its experiment.py; training has its own group
        loop.wait(timeout=10)
    finally:
        if loop.poll() is None:
            os.killpg(loop.pid, signal.SIGKILL)
    # The sandbox (bubblewrap, --die-with-parent) ends training with the experiment.py that started it.
    deadline = time.monotonic() + 10
    while not pid_gone(training) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid_gone(training)
    slow.write_text("0")
    ok(repo.loop("resume"))
    rows = check_consistent(repo)
    assert len(rows) == 3 and rows[0][3] == "keep" and killed in (1, 2)
    assert [row[3] == "crash" for row in rows[1:]] == [k == killed for k in (1, 2)], rows
    assert repo.record(killed)["runs"][0]["triage"] in ("interrupted", "signal")
    time.sleep(0.5)
    assert pid_gone(training)


def slow_run_in_flight(repo):
    pgid = (repo.pending() or {}).get("training_pgid")
    if not pgid or pid_gone(pgid):
        return False
    time.sleep(1.0)
    return (repo.pending() or {}).get("training_pgid") == pgid and not pid_gone(pgid)


def test_resume_stops_an_agent_left_running_by_a_killed_loop(repo, tmp_path):
    pids = tmp_path / "agent-pids"
    env = {"FAKE_PID_FILE": str(pids)}
    loop = repo.spawn("start", "--no-referee", "--noise-runs", "0", "--agent", "claude",
                      "--agent-bin", agent("hangs.py"), "--max-failures", "1", env=env)
    try:
        repo.wait_for(pids.exists, what="the agent")
        os.kill(loop.pid, signal.SIGKILL)  # the loop alone: its agent, in its own group, lives on
        loop.wait(timeout=10)
    finally:
        if loop.poll() is None:
            os.killpg(loop.pid, signal.SIGKILL)
    agent_pids = [int(pid) for pid in pids.read_text().split()]
    assert not any(pid_gone(pid) for pid in agent_pids)
    state = repo.state()
    assert state["stage"] == "propose" and state["agent_process"]["pgid"] == agent_pids[0]
    ok(repo.loop("resume", "--agent-timeout", "1"))
    assert all(pid_gone(pid) for pid in agent_pids)
    assert json.loads((repo.path / "runs" / "loop" / "0001" / "iteration.json").read_text())["outcome"] == "agent_error"


def test_kill_9_around_the_confirmation_of_a_marginal_win(repo):
    """A small gain (about half the default noise band) is confirmed under a new seed before any
    decision; killed as the confirmation starts and again as its result is read, nothing doubles."""
    text = (repo.path / "train.py").read_text()
    patch = "".join(difflib.unified_diff(text.splitlines(True), text.replace(
        "WARMDOWN_RATIO = 0.5 ", "WARMDOWN_RATIO = 0.52", 1).splitlines(True), "a/train.py", "b/train.py"))
    (repo.path / "next_proposal.json").write_text(json.dumps({"description": "warmdown 0.52", "patch": patch}))
    command = ["start", "--no-referee", "--noise-runs", "0", "--max-experiments", "1"]
    kill_at(repo, command, "confirm", 1)
    result = repo.loop("resume", env={"AUTORESEARCH_LOOP_KILL_AT": "triage:1"})  # the triage after confirming
    assert result.returncode == -signal.SIGKILL and (repo.pending() or {}).get("confirmation"), result.stdout
    ok(repo.loop("resume"))
    rows = check_consistent(repo)
    assert len(rows) == 2 and rows[1][4].startswith("warmdown 0.52 [mean of 2 runs]")
    confirmations = [p for p in (repo.path / "runs").glob("*/summary.json")
                     if json.loads(p.read_text()).get("kind") == "confirmation"]
    assert len(confirmations) == 1
