"""The headless loop (scripts/loop.py) with the random proposer, the human queue, the stop
conditions, stage control and status, in real temporary git repositories with a fake trainer."""

import datetime
import difflib
import json
import re
import subprocess
import sys
import time

import pytest
from loop_repo import PROJECT, LoopRepo, check_consistent, description, ok

sys.path.insert(0, str(PROJECT / "scripts"))
import common  # noqa: E402
import proposers  # noqa: E402


@pytest.fixture
def repo(tmp_path):
    return LoopRepo(tmp_path / "repo")


def test_random_loop_runs_the_baseline_and_five_experiments(repo):
    output = ok(repo.start("--agent", "random", "--max-experiments", "5", "--tag", "night"))
    rows = check_consistent(repo)
    assert len(rows) == 6 and rows[0][3] == "keep" and description(rows[0]) == "baseline"
    assert all(re.fullmatch(r"[A-Z_]+ \S+ -> \S+", description(row)) for row in rows[1:])
    assert repo.git("branch", "--show-current") == "autoresearch/night"
    assert "--max-experiments 5 reached" in output
    report = repo.report()
    assert "Stopped: --max-experiments 5 reached" in report and "## Diff from baseline to best" in report
    assert "![progress](progress.png)" in report and (repo.path / "progress.png").stat().st_size > 0
    assert "| commit | val_bpb | memory_gb | status | description |" in report  # the ledger, in its columns
    assert all("| " + " | ".join(row) + " |" in report for row in rows), report
    state = repo.state()
    assert state["stage"] == "done" and state["options"]["agent"] == "random"
    notes = (repo.path / "notes.md").read_text()
    assert notes.count("### REASONING: [loop") == 6 and notes.count("### ANALYSIS: [loop") == 6
    best = min((row for row in rows if row[3] == "keep"), key=lambda row: float(row[1]))
    assert f"- commit: {best[0]}" in notes  # Best Known Config follows the ledger
    assert repo.record(3)["runs"][0]["commit"].startswith(rows[3][0])


def test_the_random_proposer_is_reproducible_and_perturbs_the_active_setting():
    text = (PROJECT / "train.py").read_text()
    first = [proposers.random_proposal(text, "cpu", 256, 7, i) for i in range(1, 30)]
    assert first == [proposers.random_proposal(text, "cpu", 256, 7, i) for i in range(1, 30)]
    assert first != [proposers.random_proposal(text, "cpu", 256, 8, i) for i in range(1, 30)]
    cpu_block = text.index('if PROFILE in CPU_PROFILES:')
    for proposal in first:
        name = proposal["description"].split()[0]
        removed = next(line for line in proposal["patch"].splitlines() if line.startswith("-") and "=" in line)
        overridden = re.search(rf"^\s+{name} =", text[cpu_block:], flags=re.M) is not None
        assert removed.startswith("-    ") == overridden, (name, removed)  # the indented override on cpu
    gpu = proposers.random_proposal(text, "h100", 2048, 7, 1)
    assert not any(line.startswith("-    ") for line in gpu["patch"].splitlines())
    tried = [first[0]["key"]]
    assert proposers.random_proposal(text, "cpu", 256, 7, 1, tried)["key"] != first[0]["key"]


def applied(text, patch):
    """train.py after a one-line proposal patch."""
    removed = next(line[1:] for line in patch.splitlines() if line.startswith("-") and not line.startswith("---"))
    added = next(line[1:] for line in patch.splitlines() if line.startswith("+") and not line.startswith("+++"))
    return text.replace(removed, added, 1)


def test_random_proposals_keep_the_batch_a_multiple_of_one_pass():
    text = (PROJECT / "train.py").read_text()
    for iteration in range(200):
        proposal = proposers.random_proposal(text, "cpu", 256, 3, iteration)
        values = {name: number for name, (_, number) in
                  proposers.active_assignments(applied(text, proposal["patch"]), "cpu").items()}
        assert values["TOTAL_BATCH_SIZE"] % (values["DEVICE_BATCH_SIZE"] * 256) == 0, proposal["description"]
        assert values["WARMUP_RATIO"] + values["WARMDOWN_RATIO"] <= 1


def queue_patch(repo, old, new, description):
    text = (repo.path / "train.py").read_text()
    assert old in text
    changed = text.replace(old, new, 1)
    patch = "".join(difflib.unified_diff(text.splitlines(True), changed.splitlines(True), "a/train.py", "b/train.py"))
    return json.dumps({"description": description, "hypothesis": "the human thinks so", "patch": patch})


def test_the_human_queue_comes_first_and_is_archived(repo):
    (repo.path / "next_proposal.json").write_text(queue_patch(repo, "    MATRIX_LR = 0.03", "    MATRIX_LR = 0.05",
                                                               "human: matrix lr 0.05"))
    (repo.path / "proposals").mkdir()
    (repo.path / "proposals" / "01-depth.json").write_text(queue_patch(repo, "    DEPTH = 2", "    DEPTH = 3",
                                                                        "human: depth 3"))
    (repo.path / "proposals" / "02-idea.json").write_text(json.dumps(
        {"description": "try a wider MLP", "instructions": "Make the MLP 5x wide instead of 4x."}))
    ok(repo.start("--agent", "random", "--max-experiments", "3"))
    rows = check_consistent(repo)
    assert [description(row) for row in rows[1:3]] == ["human: matrix lr 0.05", "human: depth 3"]
    assert re.fullmatch(r"[A-Z_]+ \S+ -> \S+", description(rows[3]))  # then the proposer
    rejected = repo.record(3)
    assert rejected["outcome"] == "rejected" and "need an agent" in rejected["reason"]
    archived = sorted(p.name for p in (repo.path / "runs" / "loop" / "proposals").iterdir())
    assert archived == ["0001-next_proposal.json", "0002-01-depth.json", "0003-02-idea.json"]
    assert not (repo.path / "next_proposal.json").exists() and not list((repo.path / "proposals").iterdir())
    assert "- 0003 rejected: queued instructions need an agent" in repo.report()


def test_a_queued_patch_that_touches_prepare_py_is_rejected_and_the_tree_reset(repo):
    text = (repo.path / "prepare.py").read_text()
    patch = "".join(difflib.unified_diff(text.splitlines(True), (text + "# cheaper eval\n").splitlines(True),
                                         "a/prepare.py", "b/prepare.py"))
    (repo.path / "next_proposal.json").write_text(json.dumps({"description": "cheaper eval", "patch": patch}))
    ok(repo.start("--max-experiments", "1"))
    check_consistent(repo)
    record = repo.record(1)
    assert record["outcome"] == "rejected" and "prepare.py" in record["reason"]
    assert (repo.path / "prepare.py").read_text() == text


def test_status_times_a_confirmation_from_its_own_start(repo):
    """A marginal win's confirmation re-runs its commit minutes after the first run began: the
    clock and the ETA in status are the confirmation's (they read 81/43 s, ETA 0 s, counted from
    the first run)."""
    ok(repo.start("--max-experiments", "0"))
    now = datetime.datetime.now(datetime.timezone.utc)

    def ago(seconds):
        return (now - datetime.timedelta(seconds=seconds)).isoformat(timespec="seconds")

    pending = {"id": "0002", "state": "finished", "description": "a marginal win", "started_at": ago(600),
               "pid": 1, "host": "elsewhere", "boot_id": "", "run_dir": "runs/0002-abcdef0",
               "confirmation": {"state": "running", "run_dir": "runs/0003-abcdef0", "seed": 43,
                                "started_at": ago(5), **common.process_marker()}}  # this live process confirms
    (repo.path / "runs" / "pending.json").write_text(json.dumps(pending))
    flight = json.loads(ok(repo.loop("status", "--json")))["in_flight"]
    assert flight["run"] == "confirmation" and flight["state"] == "running", flight
    assert 5 <= flight["elapsed_s"] < 60, flight
    assert re.search(r"in flight: 0002 a marginal win \(running, its confirmation\)", ok(repo.loop("status")))


def test_stop_ends_the_run_after_the_current_stage_and_resume_goes_on(repo, tmp_path):
    slow = tmp_path / "slow" / "seconds"  # in a folder of its own, which the training sandbox may see
    slow.parent.mkdir()
    env = {"FAKE_SLOW_FILE": str(slow), "AUTORESEARCH_SANDBOX_SHARE": str(slow.parent)}
    started = time.monotonic()
    output = ok(repo.start("--background", env=env))
    assert time.monotonic() - started < 5 and "background" in output
    repo.wait_for(lambda: (repo.path / "results.tsv").exists() and len(repo.rows()) >= 2, what="two rows")
    slow.write_text("3")
    repo.wait_for(lambda: "in flight:" in repo.loop("status").stdout, what="a run in flight")
    status = ok(repo.loop("status"))
    assert status.startswith("loop running (pid"), status
    assert re.search(r"in flight: \d{4} .*\[#*\.*\] \d+/\d+ s \(training budget 5 s\)", status), status
    assert "stop conditions: failures in a row 0/5" in status
    ok(repo.loop("stop"))
    assert (repo.path / "STOP").exists()
    repo.wait_for(lambda: not json.loads(repo.loop("status", "--json").stdout)["running"], what="the loop to stop")
    state = repo.state()
    assert "STOP file" in state["stop_reason"] and state["stage"] == "triage"
    assert "Stopped: the STOP file is present" in repo.report()
    slow.write_text("0")
    done = len(repo.rows()) - 1
    ok(repo.loop("resume", "--max-experiments", str(done + 1), env=env))
    assert not (repo.path / "STOP").exists()
    assert len(check_consistent(repo)) == done + 2
    assert "paused before triage" in (repo.path / "runs" / "loop" / "loop.log").read_text()


def test_the_deadline_ends_the_run(repo):
    output = ok(repo.start("--hours", "0.0004", env={"FAKE_TRAIN_SECONDS": "0.3"}))
    assert "deadline" in output
    assert re.search(r"Stopped: the deadline \S+ \(--hours 0.0004\) has passed", repo.report())
    check_consistent(repo)


def test_a_plateau_ends_the_run(repo):
    ok(repo.start("--plateau", "3", env={"FAKE_FLAT": "1", "FAKE_NOISE": "0"}))
    rows = check_consistent(repo)
    assert [row[3] for row in rows] == ["keep", "discard", "discard", "discard"]
    assert "Stopped: plateau: no improvement in the last 3 experiments (--plateau 3)" in repo.report()
    again = repo.loop("resume", env={"FAKE_FLAT": "1", "FAKE_NOISE": "0"})
    assert again.returncode == 2 and "raise that limit" in again.stderr
    ok(repo.loop("resume", "--plateau", "4", env={"FAKE_FLAT": "1", "FAKE_NOISE": "0"}))
    assert len(check_consistent(repo)) == 5 and "(--plateau 4)" in repo.report()


def test_max_experiments_zero_runs_setup_and_the_baseline_only(repo):
    ok(repo.start("--max-experiments", "0"))
    assert [description(row) for row in repo.rows()] == ["baseline"]
    state = repo.state()
    assert state["stage"] == "done" and "--max-experiments 0 reached" in state["stop_reason"]
    ok(repo.loop("resume", "--max-experiments", "2"))
    assert len(check_consistent(repo)) == 3


def test_refusals_are_one_line_with_exit_code_2(repo):
    for args, words in ((["resume"], "nothing to resume"), (["status"], "no headless loop"),
                        (["start", "--agent", "command"], "--agent-command"),
                        (["start", "--max-experiments", "-1"], "0 or more"),
                        (["start", "--plateau", "0"], "at least 1"),
                        (["start", "--gpus", "0"], "--gpus must be at least 1"),
                        (["start", "--dataset", "climbmix"], "prepared with dataset builtin")):
        result = repo.loop(*args)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    (repo.path / "train.py").write_text("# changed\n")
    result = repo.start()
    assert result.returncode == 2 and "uncommitted changes" in result.stderr


def test_prepares_the_data_when_missing(repo, tmp_path):
    """No manifest: start runs prepare.py with the asked dataset and profile (a stand-in here)."""
    (repo.cache / "prepared" / "prepared.json").unlink()
    (repo.path / "prepare.py").write_text(
        "import json, os, sys\nfrom pathlib import Path\n"
        "folder = Path(os.environ['AUTORESEARCH_CACHE']) / 'prepared'\n"
        "args = dict(zip(sys.argv[1::2], sys.argv[2::2]))\n"
        "(folder / 'prepared.json').write_text(json.dumps({'profile': args['--profile'], "
        "'dataset': args['--dataset'], 'max_seq_len': 256, 'time_budget': 5}))\nprint('prepared')\n")
    repo.git("commit", "-qam", "stand-in prepare.py")
    output = ok(repo.start("--dataset", "builtin", "--profile", "cpu", "--max-experiments", "1"))
    assert "running prepare.py --dataset builtin --profile cpu" in output
    assert json.loads((repo.cache / "prepared" / "prepared.json").read_text())["dataset"] == "builtin"
    assert "prepared" in (repo.path / "runs" / "loop" / "prepare.log").read_text()
    assert len(check_consistent(repo)) == 2


def test_a_second_start_archives_the_finished_loop(repo):
    ok(repo.start("--max-experiments", "1", "--tag", "first"))
    result = repo.start("--max-experiments", "1")
    ok(result)
    assert (repo.path / "runs" / "archive" / "loop-first" / "state.json").exists()
    assert (repo.path / "runs" / "archive" / "loop-first" / "REPORT.md").exists()
    assert len(check_consistent(repo)) == 2 and repo.state()["tag"] != "first"


def test_every_flag_in_the_readme_loop_section_exists():
    readme = (PROJECT / "README.md").read_text()
    section = readme[readme.index("## Headless loop"):]
    section = section[:section.index("\n## ", 5)]
    helps = {command: subprocess.run([sys.executable, str(PROJECT / "scripts" / "loop.py"), command, "--help"],
                                     capture_output=True, text=True, check=True).stdout
             for command in ("start", "resume", "status", "stop")}
    blocks = "\n".join(re.findall(r"```(?:bash)?\n(.*?)```", section, flags=re.S))
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", blocks))
    assert {"--agent", "--max-experiments", "--background"} <= flags
    for flag in flags:
        assert any(flag in text for text in helps.values()), flag


def test_golf_reaches_setup_and_is_refused_without_the_referee(repo):
    refused = repo.start("--golf")  # start() adds --no-referee: golf is the referee's round trip
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "--golf" in refused.stderr and "--no-referee" in refused.stderr
    assert not (repo.path / "runs" / "session.json").exists()
    # The fake trainer saves no model, so its baseline has nothing for the round trip to score: the
    # point here is the session start passes --golf on, not the run.
    repo.loop("start", "--golf", "--noise-runs", "0", "--max-experiments", "0", "--tag", "g", timeout=300)
    assert json.loads((repo.path / "runs" / "session.json").read_text())["task"] == "golf"
    header = (repo.path / "results.tsv").read_text().splitlines()[0]
    assert header.split("\t") == ["commit", "val_bpb", "artifact_mb", "status", "reasoning", "description"]


def test_each_profile_sees_the_settings_train_py_gives_it():
    # train.py's blocks `if PROFILE in CPU_PROFILES:` and `if PROFILE == "golf":`, read without running it
    import search
    import tracking
    text = (PROJECT / "train.py").read_text()
    for profile, depth in (("cpu", 2), ("golf-cpu", 2), ("golf", 6), ("h100", 8)):
        assert proposers.active_assignments(text, profile)["DEPTH"][1] == depth, profile
        assert search.active_settings(text, profile)["DEPTH"][1] == depth, profile
        assert tracking.hyperparameters(text, profile)["DEPTH"] == depth, profile
    assert tracking.hyperparameters(text, "golf-cpu")["TOTAL_BATCH_SIZE"] == 2**13
