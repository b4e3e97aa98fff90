"""The experiment helpers (scripts/setup, experiment, decide, status, plot) through their command lines.

Each test builds a real git repository in a temporary folder with a copy of scripts/, a stand-in
prepare.py to pin, a prepared-data manifest in a temporary AUTORESEARCH_CACHE, and one of the fake
training scripts of tests/fixtures/fake_train as the training command.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import pid_gone
from repos import commit_new_repository, write_standin_manifest

PROJECT = Path(__file__).resolve().parent.parent
FAKES = PROJECT / "tests" / "fixtures" / "fake_train"
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
KILL_GRACE = 5  # runner.KILL_GRACE_SECONDS


def fake(name, *args):
    return " ".join(shlex.quote(part) for part in (sys.executable, str(FAKES / name), *map(str, args)))


class Repo:
    def __init__(self, path, cache):
        self.path, self.cache = path, cache
        self.env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_TRAIN_COMMAND=fake("success.py"),
                        FAKE_PID_FILE=str(path.parent / "pids"))
        self.env.pop("AUTORESEARCH_SEED", None)

    def run(self, script, *args, train=None, env=None):
        environment = dict(self.env, **(env or {}))
        if train:
            environment["AUTORESEARCH_TRAIN_COMMAND"] = train
        return subprocess.run([sys.executable, f"scripts/{script}.py", *args], cwd=self.path, env=environment,
                              capture_output=True, text=True, timeout=120)

    def git(self, *args):
        return subprocess.run(["git", *args], cwd=self.path, check=True, capture_output=True,
                              text=True).stdout.strip()

    def experiment(self, description, val_bpb=None, *extra, edit=True, train=None):
        """Edit train.py (one more line of code, so that there is a change to commit and train) and run
        an experiment."""
        if edit:
            with open(self.path / "train.py", "a") as f:
                f.write(f"IDEA = {description!r}\n")
        return self.run("experiment", description, *extra,
                        train=train or fake("success.py", 1.0 if val_bpb is None else val_bpb))

    def rows(self):
        lines = (self.path / "results.tsv").read_text().splitlines()
        assert lines[0] == HEADER
        return [line.split("\t") for line in lines[1:]]

    def head(self):
        return self.git("rev-parse", "HEAD")

    def summary(self, number):
        (run_dir,) = (self.path / "runs").glob(f"{number}-*")
        return json.loads((run_dir / "summary.json").read_text())


def ok(result, lines=1):
    """Exit 0 with `lines` lines on stdout (None: any number)."""
    assert result.returncode == 0, result.stderr + result.stdout
    assert lines is None or len(result.stdout.splitlines()) == lines, result.stdout
    return result.stdout


def refused(result, *words):
    """A refusal: exit 2, one line on stderr that says why, nothing on stdout."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""
    for word in words:
        assert word in result.stderr, result.stderr
    return result.stderr


@pytest.fixture
def repo(tmp_path):
    path, cache = tmp_path / "repo", tmp_path / "cache"
    (path / "scripts").mkdir(parents=True)
    for script in (PROJECT / "scripts").glob("*.py"):
        shutil.copy(script, path / "scripts")
    shutil.copy(PROJECT / ".gitignore", path)
    templates = PROJECT / "skills" / "ml-experiment-loop" / "templates"
    if templates.is_dir():
        shutil.copytree(templates, path / "skills" / "ml-experiment-loop" / "templates")
    shutil.copy(FAKES / "prepare_standin.py", path / "prepare.py")  # its hash and its `score` matter here
    (path / "train.py").write_text("DEPTH = 8\nLR = 0.04\nBATCH = 64\n")
    write_standin_manifest(cache, time_budget=1)
    commit_new_repository(path)
    return Repo(path, cache)


@pytest.fixture
def session(repo):
    ok(repo.run("setup", "--tag", "test", "--noise-runs", "0"))
    return repo


def hang_pids(repo):
    """Live pids (as this machine sees them) of hang.py and its child in `repo`'s runs, found by the
    FAKE_PID_FILE in their environment: in the sandbox they cannot write that file, and their own
    pids are those of the sandbox's PID namespace."""
    marker = f"FAKE_PID_FILE={repo.path.parent / 'pids'}".encode()
    found = []
    for name in os.listdir("/proc"):
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            command = Path(f"/proc/{name}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if marker in environ and (b"hang.py" in command or b"SIG_IGN" in command) and not command.startswith(b"bwrap"):
            if not pid_gone(int(name)):
                found.append(int(name))
    return sorted(found)


def wait_for_hang(repo, count, seconds=20):
    deadline = time.monotonic() + seconds
    while len(hang_pids(repo)) < count:
        assert time.monotonic() < deadline, "the hanging run never started"
        time.sleep(0.05)
    return hang_pids(repo)


def wait_for(path, seconds=20):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# setup


def test_setup_creates_branch_ledger_memory_files_and_session(session):
    assert session.git("branch", "--show-current") == "autoresearch/test"
    assert (session.path / "results.tsv").read_text() == HEADER + "\n"
    for path in ("notes.md", ".claude/context/memory/learnings.md", ".claude/context/memory/issues.md",
                 ".claude/context/memory/decisions.md"):
        assert (session.path / path).stat().st_size > 0, path
    saved = json.loads((session.path / "runs" / "session.json").read_text())
    assert saved["tag"] == "test" and saved["branch"] == "autoresearch/test"
    assert saved["profile"] == "cpu" and saved["dataset"] == "builtin"
    assert len(saved["prepare_sha256"]) == 64 and "experiment.py" in saved["helper_sha256"]
    assert saved["start_commit"] == session.head()
    assert session.git("status", "--porcelain") == ""  # everything setup made is ignored


def test_setup_never_overwrites_memory_files(repo):
    (repo.path / "notes.md").write_text("my notes\n")
    ok(repo.run("setup", "--tag", "test", "--noise-runs", "0"))
    assert (repo.path / "notes.md").read_text() == "my notes\n"


def test_setup_refuses_an_existing_branch(session):
    session.git("checkout", "-q", "main")
    refused(session.run("setup", "--tag", "test"), "autoresearch/test already exists")


def test_setup_refuses_unprepared_data_and_names_the_command(repo):
    (repo.cache / "prepared" / "prepared.json").unlink()
    refused(repo.run("setup"), "uv run prepare.py")
    assert repo.git("branch", "--show-current") == "main"


def test_setup_records_deadline_and_max_experiments(repo):
    ok(repo.run("setup", "--tag", "night", "--deadline", "2", "--max-experiments", "5", "--noise-runs", "0"))
    status = json.loads(ok(repo.run("status", "--json")))
    assert status["max_experiments"] == 5 and status["stop_reason"] is None
    assert status["deadline"].startswith("20")


def test_setup_moves_an_earlier_session_aside(session):
    ok(session.experiment("baseline"))
    ok(session.run("decide", "keep"))
    ok(session.run("setup", "--tag", "second", "--noise-runs", "0"))
    archive = session.path / "runs" / "archive" / "test"
    assert len((archive / "results.tsv").read_text().splitlines()) == 2
    assert (archive / "session.json").exists() and list(archive.glob("0001-*"))
    assert session.rows() == []
    assert json.loads((session.path / "runs" / "session.json").read_text())["tag"] == "second"


# ---------------------------------------------------------------------------
# experiment and decide


def test_keep_improvements_and_discard_a_regression(session):
    first = ok(session.experiment("baseline", 1.0))
    assert first.startswith("0001 ") and "(baseline; noise 0.001000)" in first  # one run: the noise is as it was
    ok(session.run("decide", "keep"))
    better = ok(session.experiment("lower lr", 0.99))
    assert "improved" in better and "-0.010000" in better
    ok(session.run("decide", "keep"))
    kept_commit, kept_train = session.head(), (session.path / "train.py").read_text()
    worse = ok(session.experiment("bigger batch", 1.05))
    assert "not improved" in worse
    refused(session.run("decide", "keep"), "worse than the best kept")
    ok(session.run("decide", "discard"))
    assert session.head() == kept_commit
    assert (session.path / "train.py").read_text() == kept_train
    assert [(row[1], row[3], row[4]) for row in session.rows()] == [
        ("1.000000", "keep", "baseline"), ("0.990000", "keep", "lower lr"), ("1.050000", "discard", "bigger batch")]
    assert session.rows()[1][0] == kept_commit[:7] and session.rows()[1][2] == "2.0"
    assert session.git("log", "-1", "--format=%s", session.rows()[2][0]) == "experiment: bigger batch"


def test_summary_json_records_the_experiment(session):
    ok(session.experiment("baseline", 1.0))
    ok(session.run("decide", "keep"))
    ok(session.experiment("deeper", 0.98))
    summary = session.summary("0002")
    assert summary["val_bpb"] == 0.98 and summary["metrics"]["num_steps"] == 3
    assert summary["commit"] == session.head() and summary["parent"] == session.git("rev-parse", "HEAD~1")
    assert "+IDEA = 'deeper'" in summary["diff"] and summary["description"] == "deeper"
    assert summary["seed"] == 42 and summary["profile"] == "cpu" and summary["dataset"] == "builtin"
    assert summary["timeout_s"] == 2 * 1 + 120  # twice the manifest's time budget plus the margin
    assert summary["exit_code"] == 0 and summary["triage"] is None and summary["verdict"] == "improved"
    assert summary["best_before"]["val_bpb"] == 1.0 and len(summary["prepare_sha256"]) == 64
    for key in ("host", "python", "torch", "started_at", "finished_at", "wall_seconds"):
        assert key in summary
    pending = json.loads((session.path / "runs" / "pending.json").read_text())
    assert pending["id"] == "0002" and pending["state"] == "finished" and pending["val_bpb"] == 0.98
    ok(session.run("decide", "keep"))
    assert session.summary("0002")["decision"]["status"] == "keep"
    assert not (session.path / "runs" / "pending.json").exists()


def test_unchanged_train_py_reruns_head(session):
    start = session.head()
    ok(session.experiment("baseline", 1.0, edit=False))
    assert session.head() == start and session.summary("0001")["rerun"] is True
    assert session.summary("0001")["commit"] == start


def test_forced_keep_is_recorded(session):
    ok(session.experiment("baseline", 1.0))
    ok(session.run("decide", "keep"))
    ok(session.experiment("worse", 1.2))
    assert "forced" in ok(session.run("decide", "keep", "--force"))
    assert session.rows()[-1][3:] == ["keep", "worse [forced keep]"]


def test_simplification_within_noise_may_be_kept(session):
    ok(session.experiment("baseline", 1.0))
    ok(session.run("decide", "keep"))
    lines = (session.path / "train.py").read_text().splitlines()
    (session.path / "train.py").write_text("\n".join(lines[1:]) + "\n")
    assert "simpler" in ok(session.experiment("drop DEPTH", 1.0005, edit=False))
    ok(session.run("decide", "keep"))
    assert session.rows()[-1][3] == "keep"


def test_train_command_option_seed_and_root_run_log(session):
    result = session.run("experiment", "seeded", "--seed", "7", "--train-command", fake("success.py", 0.9))
    ok(result)
    assert session.summary("0001")["seed"] == 7 and session.summary("0001")["metrics"]["seed"] == 7
    run_log = session.path / "run.log"
    assert run_log.resolve() == next((session.path / "runs").glob("0001-*")).resolve() / "run.log"
    # train.py's own line (a fake that sees no sandboxed evaluation data prints one anyway), then the
    # referee's, appended by the helper: the last one is the number that decided
    assert [line for line in run_log.read_text().splitlines() if line.startswith("val_bpb:")] == [
        "val_bpb:          0.900000", "val_bpb:          0.900000"]
    assert run_log.read_text().splitlines()[-2].startswith("referee:          runs/0001-")


@pytest.mark.parametrize("script, kind, words", [
    ("raises.py", "exception", "ValueError: shape mismatch"),
    ("oom.py", "oom", "OutOfMemoryError"),
    ("nan.py", "fast_fail", "fast_fail: loss is nan"),
    ("no_summary.py", "no_summary", "no summary"),
])
def test_crash_is_triaged_recorded_as_crash_and_reset(session, script, kind, words):
    ok(session.experiment("baseline", 1.0))
    ok(session.run("decide", "keep"))
    base = session.head()
    result = session.experiment(f"try {kind}", train=fake(script))
    assert result.returncode == 1
    assert 2 <= len(result.stdout.splitlines()) <= 3 and len(result.stdout.encode()) <= 300
    assert f"crash ({kind})" in result.stdout and words in result.stdout
    assert session.summary("0002")["triage"]["kind"] == kind
    assert "it crashed" in ok(session.run("decide", "keep"))  # a crash is a crash whatever was asked
    assert session.rows()[-1][1:4] == ["0.000000", "0.0", "crash"]
    assert session.head() == base and "try" not in (session.path / "train.py").read_text()


def test_hung_run_and_its_child_are_killed(session):
    started = time.monotonic()
    result = session.experiment("hang", None, "--timeout", "1", train=fake("hang.py"))
    elapsed = time.monotonic() - started
    assert result.returncode == 1 and "crash (timeout)" in result.stdout
    assert "step 00000" in (session.path / "run.log").read_text()  # it ran, and hang.py starts its child first
    assert hang_pids(session) == []
    assert elapsed < 1 + KILL_GRACE + 3
    ok(session.run("decide", "discard"))
    assert session.rows()[-1][3] == "crash"


@pytest.mark.parametrize("crash", [False, True])
def test_a_50_mb_flood_gives_at_most_300_console_bytes(session, crash):
    result = session.experiment("flood", train=fake("flood.py", 50, *(["crash"] if crash else [])))
    assert result.returncode == (1 if crash else 0)
    assert len(result.stdout.encode()) + len(result.stderr.encode()) <= 300, result.stdout
    assert (session.path / "run.log").stat().st_size > 50_000_000
    if crash:
        assert "RuntimeError: exploded" in result.stdout


def test_sigterm_to_experiment_stops_training_and_records_a_crash(session):
    with open(session.path / "train.py", "a") as f:
        f.write("# interrupted\n")
    process = subprocess.Popen([sys.executable, "scripts/experiment.py", "interrupted"], cwd=session.path,
                               env=dict(session.env, AUTORESEARCH_TRAIN_COMMAND=fake("hang.py"), FAKE_HANG_CHILD="0"),
                               stdout=subprocess.PIPE, text=True)
    wait_for_hang(session, 1)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=30)
    assert process.returncode == 1 and "crash (interrupted)" in stdout
    assert hang_pids(session) == []
    assert "recorded as crash" in ok(session.run("decide", "discard"))


# ---------------------------------------------------------------------------
# refusals


def test_refuses_other_tracked_changes_and_lists_them(session):
    (session.path / "prepare.py").write_text("# tampered\n")
    (session.path / "scratch.txt").write_text("untracked files do not count\n")
    refused(session.experiment("sneaky"), "only train.py may change", "prepare.py")


def test_refuses_off_the_session_branch(session):
    session.git("checkout", "-q", "-b", "elsewhere")
    refused(session.experiment("lost"), "not on an autoresearch/* branch")
    session.git("checkout", "-q", "-b", "autoresearch/other")
    refused(session.experiment("lost"), "the session is autoresearch/test")


def test_refuses_a_committed_edit_of_prepare_py(session):
    (session.path / "prepare.py").write_text("# a different protocol\n")
    session.git("commit", "-q", "-am", "change the referee")
    refused(session.experiment("cheat"), "prepare.py no longer matches")


def test_refuses_a_committed_edit_of_a_helper(session):
    with open(session.path / "scripts" / "status.py", "a") as f:
        f.write("# edited\n")
    session.git("commit", "-q", "-am", "edit a helper")
    refused(session.experiment("cheat"), "scripts/status.py no longer matches")


def test_refuses_when_data_is_no_longer_prepared(session):
    (session.cache / "prepared" / "prepared.json").unlink()
    refused(session.experiment("no data"), "uv run prepare.py")


def test_refuses_without_a_session(repo):
    refused(repo.experiment("too early"), "setup.py")
    refused(repo.run("decide", "keep"), "setup.py")


def test_decide_refuses_when_nothing_is_pending(session):
    refused(session.run("decide", "discard"), "nothing is pending")


def test_experiment_refuses_while_one_is_pending(session):
    ok(session.experiment("baseline"))
    refused(session.experiment("second"), "experiment 0001 is pending a decision", "decide.py keep|discard")


def test_discard_refuses_uncommitted_changes_and_never_touches_untracked_files(session):
    ok(session.experiment("baseline", 1.0))
    ok(session.run("decide", "keep"))
    ok(session.experiment("worse", 1.1))
    (session.path / "train.py").write_text("# next idea, not committed\n")
    refused(session.run("decide", "discard"), "uncommitted changes", "train.py")
    session.git("checkout", "-q", "--", "train.py")
    (session.path / "notes.md").write_text("keep me\n")
    ok(session.run("decide", "discard"))
    assert (session.path / "notes.md").read_text() == "keep me\n"
    assert (session.path / "runs" / f"0002-{session.rows()[-1][0]}" / "run.log").exists()


# ---------------------------------------------------------------------------
# reliability


def test_concurrent_appends_give_whole_rows(session):
    writer = ("import sys; sys.path.insert(0, 'scripts'); import common\n"
              "for i in range(100):\n"
              "    common.append_ledger_row(common.LedgerRow('abcdef%d' % int(sys.argv[1]), 1 + i / 1000, 1.5,"
              " 'discard', 'writer %s row %d ' % (sys.argv[1], i) + 'x' * 3000))\n")
    writers = [subprocess.Popen([sys.executable, "-c", writer, str(n)], cwd=session.path) for n in (1, 2)]
    assert [process.wait(timeout=60) for process in writers] == [0, 0]
    rows = session.rows()
    assert len(rows) == 200 and all(len(row) == 5 and row[3] == "discard" for row in rows)
    assert session.run("status").returncode == 0


def test_a_corrupt_ledger_line_is_named(session):
    ok(session.experiment("baseline", 1.0))
    ok(session.run("decide", "keep"))
    with open(session.path / "results.tsv", "a") as f:
        f.write("abc1234 0.99 keep hand-typed with spaces\n")
    refused(session.run("status"), "results.tsv line 3")
    refused(session.experiment("next"), "results.tsv line 3")
    assert not list((session.path / "runs").glob("0002-*"))  # refused before training


def test_a_foreign_ledger_is_refused(session):
    (session.path / "results.tsv").write_text("name,score\nfoo,1\n")
    refused(session.run("status"), "results.tsv line 1")


def test_kill_between_commit_and_record_is_detected_and_closed(session):
    ok(session.experiment("baseline", 1.0))
    ok(session.run("decide", "keep"))
    base = session.head()
    with open(session.path / "train.py", "a") as f:
        f.write("# killed\n")
    process = subprocess.Popen([sys.executable, "scripts/experiment.py", "killed"], cwd=session.path,
                               env=dict(session.env, AUTORESEARCH_TRAIN_COMMAND=fake("hang.py"), FAKE_HANG_CHILD="0"))
    (training,) = wait_for_hang(session, 1)
    process.kill()
    process.wait()
    sandboxed = json.loads((session.path / "runs" / "session.json").read_text())["sandbox"] == "on"
    if sandboxed:  # bwrap --die-with-parent: the run's PID namespace ends with experiment.py
        deadline = time.monotonic() + 10
        while not pid_gone(training):
            assert time.monotonic() < deadline, "training outlived a killed experiment.py in the sandbox"
            time.sleep(0.05)
    else:
        assert not pid_gone(training)  # orphaned: experiment.py could not clean up after SIGKILL
    refused(session.experiment("next", edit=False), "experiment 0002 was interrupted", "decide.py discard")
    assert "0002" in json.loads(ok(session.run("status", "--json")))["pending"]["message"]
    assert "recorded as crash" in ok(session.run("decide", "keep"))
    assert pid_gone(training) and session.head() == base
    assert [row[3] for row in session.rows()] == ["keep", "crash"]
    refused(session.run("decide", "discard"), "nothing is pending")


def test_a_decision_interrupted_after_its_row_is_finished_without_a_second_row(session):
    ok(session.experiment("baseline", 1.0))
    ok(session.run("decide", "keep"))
    base = session.head()
    ok(session.experiment("worse", 1.1))
    # What decide.py leaves when killed right after appending the row: the decision in
    # pending.json, the row in the ledger, the branch not yet reset.
    pending_path = session.path / "runs" / "pending.json"
    pending = json.loads(pending_path.read_text())
    pending["decision"] = {"status": "discard", "forced": False, "asked": "discard",
                           "decided_at": "2026-11-23T08:00:00+00:00", "ledger_rows_before": 1}
    pending_path.write_text(json.dumps(pending))
    with open(session.path / "results.tsv", "a") as f:
        f.write(f"{pending['commit'][:7]}\t1.100000\t2.0\tdiscard\tworse\n")
    ok(session.run("decide", "discard"))
    assert [row[3] for row in session.rows()] == ["keep", "discard"]
    assert session.head() == base


def test_backtrack_rewinds_to_a_kept_commit_and_compares_against_it(session):
    ok(session.experiment("baseline", 1.0))
    ok(session.run("decide", "keep"))
    ok(session.experiment("second", 0.99))
    ok(session.run("decide", "keep"))
    second = session.head()
    ok(session.experiment("third", 0.98))
    ok(session.run("decide", "keep"))
    refused(session.run("decide", "backtrack"), "already at")  # the default target, the best, is HEAD
    refused(session.run("decide", "backtrack", "1234567"), "not a kept commit")
    ok(session.run("decide", "backtrack", second[:7], "--reason", "third interacts badly"))
    assert session.head() == second
    assert session.rows()[-1][3:] == ["backtrack", f"backtrack to {second[:7]} (third interacts badly)"]
    assert "improved" in ok(session.experiment("fourth", 0.985))  # better than 0.99, the best up to `second`
    ok(session.run("decide", "discard"))
    assert session.head() == second  # discard resets to the backtrack target, not to the abandoned best


def test_status_text_and_json(session):
    ok(session.experiment("baseline", 1.0))
    ok(session.run("decide", "keep"))
    ok(session.experiment("better", 0.95))
    ok(session.run("decide", "keep"))
    assert session.experiment("crashes", train=fake("raises.py")).returncode == 1
    ok(session.run("decide", "discard"))
    ok(session.experiment("pending one", 0.97))
    text = session.run("status").stdout
    assert "best val_bpb 0.950000" in text and "keep 2, discard 0, crash 1" in text
    assert "pending a decision" in text and len(text.splitlines()) <= 10
    status = json.loads(ok(session.run("status", "--json")))
    assert status["best"]["val_bpb"] == 0.95 and status["best"]["description"] == "better"
    assert status["baseline"]["val_bpb"] == 1.0 and status["counts"]["crash"] == 1
    assert status["experiments"] == 3 and status["pending"]["id"] == "0004"
    assert status["minutes_since_improvement"] is not None and len(status["last_rows"]) == 3
    assert status["branch"] == "autoresearch/test" and status["noise_bpb"] == 0.001


@pytest.mark.parametrize("count", [1, 200])
def test_plot_writes_progress_png(session, count):
    statuses = ["keep"] + ["discard", "discard", "keep", "crash", "discard"] * 40
    with open(session.path / "results.tsv", "a") as f:
        for number, status in enumerate(statuses[:count]):
            value = 0.0 if status == "crash" else 1.0 - number * 0.0005 + (0.002 if status == "discard" else 0)
            value = 9.0 if number == 7 else value  # one diverged run must not squash the plot
            f.write(f"{number:07x}\t{value:.6f}\t2.0\t{status}\tidea number {number}\n")
    output = ok(session.run("plot"))
    assert f"({count} experiments)" in output
    assert (session.path / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_the_plot_counts_each_discard_once_and_numbers_experiments_in_whole_steps(session):
    # The walk's night: a baseline, two discards far above it (drawn at the top edge), one below it.
    with open(session.path / "results.tsv", "a") as f:
        for number, (value, status) in enumerate([(1.676213, "keep"), (1.724848, "discard"),
                                                  (1.710778, "discard"), (1.667404, "discard")]):
            f.write(f"{number:07x}\t{value:.6f}\t0.0\t{status}\tidea number {number}\n")
    probe = ("import sys; sys.path.insert(0, 'scripts'); import common, plot\n"
             "figure = plot.figure(common.read_ledger(), 'test')[0]\n"
             "axes = figure.axes[0]\n"
             "print([text.get_text() for text in axes.get_legend().get_texts()])\n"
             "print([float(tick) for tick in axes.get_xticks() if axes.get_xlim()[0] <= tick <= axes.get_xlim()[1]])\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=session.path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    legend, ticks = (eval(line) for line in result.stdout.splitlines())  # noqa: S307 (our own probe's output)
    assert legend[:3] == ["discarded (1)", "discarded, off the top (2)", "kept (1)"], legend
    assert ticks and all(float(tick).is_integer() for tick in ticks), ticks

def test_plot_refuses_an_empty_ledger(session):
    refused(session.run("plot"), "no experiments")
