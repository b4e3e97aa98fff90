"""An external task (autoresearch.toml, scripts/task.py): the harness researching a training script
of the researcher's own, here a stand-in for openai/parameter-golf's train_gpt.py.

Each test builds a real git repository in a temporary folder with a copy of scripts/ and the hooks,
the stand-in train_gpt.py (pure Python, no torch: it prints the challenge's real log lines, with
numbers derived from its own hyperparameters, in well under a second) and a task file modelled on
tasks/parameter-golf.toml, then drives the real helpers through their command lines.
"""

import difflib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from repos import commit_new_repository

PROJECT = Path(__file__).resolve().parent.parent

STANDIN = '''"""Stand-in for parameter golf's train_gpt.py: the challenge's log lines, no training."""
import os

MODEL_DIM = 512  # width
LEARNING_RATE = 0.04  # Adam's step
NUM_LAYERS = 9

seed = int(os.environ.get("SEED", "1"))
val_bpb = 1.2 + abs(LEARNING_RATE - 0.05) * 10 + (seed % 7) * 1e-5
size = MODEL_DIM * NUM_LAYERS * 3000
print(f"step:100/20000 val_loss:2.0 val_bpb:{val_bpb + 0.1:.4f} train_time:10ms step_avg:0.1ms")
print(f"Serialized model int8+zlib: {size - 50000} bytes")
print(f"Total submission size int8+zlib: {size} bytes")
print(f"final_int8_zlib_roundtrip val_loss:2.0 val_bpb:{val_bpb:.8f} eval_time:5ms")
'''

TASK = '''name = "golf-standin"
editable = ["train_gpt.py"]
command = "{python} train_gpt.py"
time_budget = 5
timeout = 60
seed_env = "SEED"
hidden = ["data/val_*.bin"]

[metric]
name = "val_bpb"
pattern = 'final_int8_zlib_roundtrip val_loss:\\S+ val_bpb:(\\S+)'
direction = "{direction}"

[[constraints]]
name = "artifact_bytes"
pattern = 'Total submission size int8\\+zlib: (\\d+) bytes'
max = 16000000

[[columns]]
name = "artifact_mb"
from = "artifact_bytes"
scale = 1e-6
'''


# A higher-is-better task under another name than val_bpb: a helper that ranks lower-is-better, or
# writes the literal val_bpb, fails its tests.
SCORE_TASK = TASK.replace('name = "val_bpb"', 'name = "score"')


class Repo:
    def __init__(self, path):
        self.path = path
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith("AUTORESEARCH_") and key != "CLAUDE_PROJECT_DIR"}
        self.env["AUTORESEARCH_CACHE"] = str(path.parent / "no-cache")  # nothing prepared: none needed

    def run(self, script, *args, timeout=120):
        return subprocess.run([sys.executable, f"scripts/{script}.py", *args], cwd=self.path, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def git(self, *args):
        return subprocess.run(["git", *args], cwd=self.path, check=True, capture_output=True, text=True).stdout.strip()

    def edit(self, old, new):
        path = self.path / "train_gpt.py"
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))

    def ledger(self):
        return [line.split("\t") for line in (self.path / "results.tsv").read_text().splitlines()]

    def summary(self, number):
        (run_dir,) = (self.path / "runs").glob(f"{number}-*")
        return json.loads((run_dir / "summary.json").read_text())


def make_repo(tmp_path, direction="lower", task=None):
    path = tmp_path / "repo"
    path.mkdir()
    shutil.copytree(PROJECT / "scripts", path / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PROJECT / ".claude" / "hooks", path / ".claude" / "hooks",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / ".gitignore", path)
    shutil.copytree(PROJECT / "skills" / "ml-experiment-loop" / "templates",
                    path / "skills" / "ml-experiment-loop" / "templates")
    (path / "train_gpt.py").write_text(STANDIN)
    (path / "data").mkdir()
    (path / "data" / "val_000.bin").write_text("evaluation only\n")
    (path / "autoresearch.toml").write_text(task or TASK.format(python=sys.executable, direction=direction))
    commit_new_repository(path)
    return Repo(path)


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def refused(result, *words):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    return result.stderr


@pytest.fixture
def repo(tmp_path):
    repo = make_repo(tmp_path)
    setup = ok(repo.run("setup", "--tag", "ext", "--noise-runs", "0"))
    assert "task golf-standin" in setup and "self-reported" in setup, setup
    return repo


def test_setup_needs_no_prepared_data_and_pins_the_task(repo):
    session = json.loads((repo.path / "runs" / "session.json").read_text())
    assert session["task"] == "external" and session["referee"] == "off" and session["time_budget"] == 5
    assert session["task_sha256"] == __import__("hashlib").sha256((repo.path / "autoresearch.toml").read_bytes()).hexdigest()
    assert session["metric"] == {"name": "val_bpb", "direction": "lower"}
    assert repo.ledger() == [["commit", "val_bpb", "artifact_mb", "status", "description"]]


def test_experiment_decide_status_on_the_external_task(repo):
    baseline = ok(repo.run("experiment", "baseline"))
    assert baseline.startswith("0001 ") and "val_bpb 1.300000" in baseline and "baseline" in baseline, baseline
    assert "self-reported" in baseline and "artifact_bytes 13,824,000" in baseline, baseline
    summary = repo.summary("0001")
    assert summary["self_reported"] is True and summary["verified"] is False and summary["referee"] == "off"
    assert summary["constraints"] == {"artifact_bytes": 13824000.0} and summary["val_bpb"] == pytest.approx(1.3)
    ok(repo.run("decide", "keep"))

    repo.edit("LEARNING_RATE = 0.04", "LEARNING_RATE = 0.05")  # the stand-in's best: 0.1 lower
    better = ok(repo.run("experiment", "lr 0.05"))
    assert "val_bpb 1.200000" in better and ": improved" in better and "decide.py keep" in better, better
    assert repo.git("show", "--stat", "--format=%s", "HEAD").startswith("experiment: lr 0.05")
    assert "train_gpt.py" in repo.git("show", "--name-only", "--format=", "HEAD")
    ok(repo.run("decide", "keep"))

    rows = repo.ledger()[1:]
    assert [row[3] for row in rows] == ["keep", "keep"]
    assert rows[1][1] == "1.200000" and rows[1][2] == "13.824000", rows

    status = ok(repo.run("status"))
    assert "best val_bpb 1.200000" in status and "task golf-standin" in status and "self-reported" in status, status
    assert "\t".join(rows[1]) in status
    report = json.loads(ok(repo.run("status", "--json")))
    assert report["self_reported"] is True and report["best"]["extras"] == {"artifact_mb": 13.824}


def test_a_broken_constraint_is_its_own_status_and_never_kept(repo):
    ok(repo.run("experiment", "baseline"))
    ok(repo.run("decide", "keep"))
    repo.edit("MODEL_DIM = 512", "MODEL_DIM = 1024")  # 27,648,000 bytes: over the limit
    big = repo.run("experiment", "width 1024")
    assert big.returncode == 1 and big.stdout.startswith("0002 "), big.stdout + big.stderr
    assert "constraint: artifact_bytes 27,648,000 over the max 16,000,000" in big.stdout, big.stdout
    assert "self-reported" in big.stdout and "never kept" in big.stdout
    assert repo.summary("0002")["status"] == "constraint"
    kept = ok(repo.run("decide", "keep", "--force"))
    assert "recorded as constraint" in kept, kept
    assert repo.ledger()[-1][2:4] == ["27.648000", "constraint"]
    assert "MODEL_DIM = 512" in (repo.path / "train_gpt.py").read_text()  # reset to the kept commit
    assert "constraint 1" in ok(repo.run("status"))


def test_higher_is_better_keeps_a_rise(tmp_path):
    task = TASK.format(python=sys.executable, direction="higher")
    repo = make_repo(tmp_path, task=task)
    ok(repo.run("setup", "--tag", "up", "--noise-runs", "0"))
    ok(repo.run("experiment", "baseline"))
    ok(repo.run("decide", "keep"))
    repo.edit("LEARNING_RATE = 0.04", "LEARNING_RATE = 0.05")  # 0.1 lower: worse when higher is better
    lower = ok(repo.run("experiment", "lr 0.05"))
    assert "not improved" in lower, lower
    refused(repo.run("decide", "keep"), "worse than the best kept")
    ok(repo.run("decide", "discard"))
    repo.edit("LEARNING_RATE = 0.04", "LEARNING_RATE = 0.01")  # 0.3 higher
    higher = ok(repo.run("experiment", "lr 0.01"))
    assert ": improved" in higher, higher
    ok(repo.run("decide", "keep"))
    assert "best val_bpb 1.600000" in ok(repo.run("status"))


def test_a_changed_task_file_is_refused_mid_session(repo):
    ok(repo.run("experiment", "baseline"))
    ok(repo.run("decide", "keep"))
    path = repo.path / "autoresearch.toml"
    path.write_text(path.read_text().replace("max = 16000000", "max = 99000000"))
    repo.git("commit", "-qam", "loosen the limit")
    repo.edit("MODEL_DIM = 512", "MODEL_DIM = 1024")
    refused(repo.run("experiment", "width 1024"), "autoresearch.toml no longer matches the hash pinned at setup")


def test_only_the_editable_files_may_change(repo):
    (repo.path / ".gitignore").write_text((repo.path / ".gitignore").read_text() + "data/\n")
    refused(repo.run("experiment", "baseline"), "only train_gpt.py may change", ".gitignore")


@pytest.mark.parametrize("text, words", [
    ("name = [", "not valid TOML"),
    ('editable = ["train_gpt.py"]\ncommand = "x"\ntime_budget = 5\ntimeout = 60\n', "[metric]"),
    (TASK.replace("direction = \"{direction}\"", 'direction = "sideways"'), "metric.direction"),
    (TASK.replace("(\\S+)", "\\S+"), "metric.pattern must have exactly one group"),
    (TASK.replace('editable = ["train_gpt.py"]', 'editable = ["scripts/experiment.py"]'), "editable"),
    (TASK.replace("timeout = 60", "timeout = 1"), "timeout"),
    ("surprise = 1\n" + TASK, "surprise"),
])
def test_a_malformed_task_file_is_one_line_and_a_non_zero_exit(tmp_path, text, words):
    repo = make_repo(tmp_path, task=text.replace("{python}", sys.executable).replace("{direction}", "lower"))
    refused(repo.run("setup", "--tag", "bad", "--noise-runs", "0"), "autoresearch.toml", words)
    assert not (repo.path / "runs" / "session.json").exists()


def test_noise_runs_run_the_tasks_command(tmp_path):
    repo = make_repo(tmp_path)
    out = ok(repo.run("setup", "--tag", "noisy", "--noise-runs", "2"))
    assert "noise 0.0000" in out, out  # the stand-in's seed moves val_bpb by 1e-5
    session = json.loads((repo.path / "runs" / "session.json").read_text())
    assert [run["seed"] for run in session["noise_runs"]] == [43, 44] and session["allowance_s"] is not None


def guard(repo, tool, tool_input):
    """The guard hook's reason for refusing the call, or None when it allows it (run as a client runs it)."""
    payload = {"tool_name": tool, "tool_input": tool_input, "cwd": str(repo.path)}
    env = dict(repo.env, CLAUDE_PROJECT_DIR=str(repo.path))
    result = subprocess.run([sys.executable, str(repo.path / ".claude" / "hooks" / "guard_tool_use.py")],
                            input=json.dumps(payload), capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode in (0, 2), result.stderr
    return result.stderr.strip() if result.returncode == 2 else None


def test_the_guard_follows_the_task(repo):
    root = repo.path
    assert guard(repo, "Edit", {"file_path": str(root / "train_gpt.py"), "old_string": "a", "new_string": "b"}) is None
    assert guard(repo, "Write", {"file_path": str(root / "notes.md"), "content": "x"}) is None
    reason = guard(repo, "Edit", {"file_path": str(root / "autoresearch.toml"), "old_string": "a", "new_string": "b"})
    assert reason and "train_gpt.py" in reason, reason
    assert guard(repo, "Write", {"file_path": str(root / "scripts" / "task.py"), "content": "x"})
    assert guard(repo, "Write", {"file_path": str(root / "train.py"), "content": "x"})  # not this task's file
    assert "evaluation" in guard(repo, "Read", {"file_path": str(root / "data" / "val_000.bin")})
    assert guard(repo, "Bash", {"command": "git checkout -- train_gpt.py"}) is None


def test_the_random_loop_runs_on_the_external_task(tmp_path):
    repo = make_repo(tmp_path)
    result = repo.run("loop", "start", "--tag", "loop", "--max-experiments", "2", "--noise-runs", "0", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = repo.ledger()
    assert rows[0] == ["commit", "val_bpb", "artifact_mb", "status", "description"] and len(rows) == 4, rows
    assert rows[1][3] == "keep" and all(row[3] in ("keep", "discard", "constraint") for row in rows[2:]), rows
    assert any(name in row[4] for row in rows[2:] for name in ("MODEL_DIM", "LEARNING_RATE", "NUM_LAYERS")), rows
    report = (repo.path / "REPORT.md").read_text()
    assert "self-reported" in report and "train_gpt.py" in report, report


def test_the_shipped_task_files_read_the_challenges_log_lines():
    sys.path.insert(0, str(PROJECT / "scripts"))
    import task
    golf = task.load(PROJECT / "tasks" / "parameter-golf.toml")
    log = ("step:200/20000 val_loss:2.1 val_bpb:1.3 train_time:1ms step_avg:1ms\n"
           "Total submission size int8+zlib: 15834567 bytes\n"
           "final_int8_zlib_roundtrip val_loss:2.0512 val_bpb:1.2244 eval_time:12345ms\n"
           "final_int8_zlib_roundtrip_exact val_loss:2.05123456 val_bpb:1.22441234\n")
    assert golf.read_metric(log) == 1.22441234 and golf.direction == "lower" and golf.timeout == 900
    assert golf.violations(golf.read_constraints(log)) == [] and "torchrun --standalone --nproc_per_node=8" in golf.command[2]
    assert golf.violations({"artifact_bytes": 16_000_000.0}) == ["artifact_bytes 16,000,000 over the max 15,999,999"]
    assert golf.ledger_columns() == ("commit", "val_bpb", "artifact_mb", "status", "description")
    single = task.load(PROJECT / "tasks" / "single-script.toml")
    assert single.read_metric("step 1\nval_loss: 3.25\nval_loss: 3.125\n") == 3.125


def queue_edit(repo, old, new, description):
    """A human-queue proposal (next_proposal.json) that makes one edit to train_gpt.py."""
    text = (repo.path / "train_gpt.py").read_text()
    assert old in text
    patch = "".join(difflib.unified_diff(text.splitlines(True), text.replace(old, new, 1).splitlines(True),
                                         "a/train_gpt.py", "b/train_gpt.py"))
    (repo.path / "next_proposal.json").write_text(json.dumps({"description": description, "patch": patch}))


def test_the_loops_notes_call_a_constraint_violation_one_and_name_the_tasks_metric(tmp_path):
    repo = make_repo(tmp_path, task=SCORE_TASK.format(python=sys.executable, direction="lower"))
    queue_edit(repo, "MODEL_DIM = 512", "MODEL_DIM = 1024", "width 1024")  # 27,648,000 bytes: over the limit
    ok(repo.run("loop", "start", "--tag", "notes", "--max-experiments", "1", "--noise-runs", "0", timeout=300))
    assert [row[3] for row in repo.ledger()[1:]] == ["keep", "constraint"]
    notes = (repo.path / "notes.md").read_text()
    analysis = notes.split("### ANALYSIS: [loop 0001] width 1024")[1].split("###")[0]
    assert "- result: constraint violation (artifact_bytes 27,648,000 over the max 16,000,000): score 1.300000 " \
           "self-reported, never kept" in analysis, analysis
    assert "crash" not in analysis and "did not finish" not in analysis, analysis
    best = notes.split("## Best Known Config")[1].split("\n## ")[0]
    assert "- score: 1.300000" in best and "val_bpb" not in best, best


# The stand-in's score, shifted by the lane's GPU: each lane's ledger shows which GPU trained it, and
# lane1 (GPU 7: 70 and some) beats lane0 (GPU 3: 30 and some) whatever the random proposer tried.
LANE_STANDIN = STANDIN.replace("val_bpb = 1.2 +", 'val_bpb = 10 * int(os.environ["CUDA_VISIBLE_DEVICES"]) + 1.2 +')


def lanes_status(repo):
    return json.loads(ok(repo.run("lanes", "status", "--json")))


def test_local_lanes_on_an_external_task_rank_by_its_metric_and_direction(tmp_path):
    repo = make_repo(tmp_path, task=SCORE_TASK.format(python=sys.executable, direction="higher"))
    (repo.path / "train_gpt.py").write_text(LANE_STANDIN)
    repo.git("commit", "-qam", "the score follows the GPU")
    out = ok(repo.run("lanes", "start", "2", "--backend", "local", "--tag", "ext", "--gpu-ids", "3,7",
                      "--", "--noise-runs", "0", "--max-experiments", "2", "--timeout", "30"))
    assert "2 loops started on GPUs 3,7" in out, out
    deadline = time.monotonic() + 120
    while (status := lanes_status(repo))["running"] and time.monotonic() < deadline:
        time.sleep(1)
    assert status["running"] == 0, status
    assert status["experiments"] == 6 and status["task"] == "golf-standin" and status["metric"] == "score"
    assert status["direction"] == "higher" and status["self_reported"] is True
    for gpu, lane in zip((3, 7), sorted((repo.path / "runs" / "lanes" / "ext").glob("lane*"))):
        lines = [line.split("\t") for line in (lane / "results.tsv").read_text().splitlines()]
        assert lines[0] == ["commit", "score", "artifact_mb", "status", "description"] and len(lines) == 4, lines
        assert lines[1][3] == "keep" and all(row[3] in ("keep", "discard", "constraint") for row in lines[1:]), lines
        # each row trained on the lane's own GPU, and has the task's column
        assert all(10 * gpu < float(row[1]) < 10 * gpu + 10 and float(row[2]) > 0 for row in lines[1:]), lines
    assert not (repo.path / "results.tsv").exists()  # the main checkout's ledger is no lane's
    best = status["best"]
    assert best["lane"] == "lane1" and best["val_bpb"] == max(lane["best"]["val_bpb"] for lane in status["lanes"])
    assert best["extras"]["artifact_mb"] > 0
    text = ok(repo.run("lanes", "status"))
    assert f"best score {best['val_bpb']:.6f} in lane1" in text, text
    assert "task golf-standin (autoresearch.toml: score, higher is better, self-reported)" in text, text
    assert "wrote runs/lanes/ext-progress.png (2 lanes, 6 experiments)" in ok(repo.run("lanes", "plot"))


def test_cluster_lanes_of_an_external_task_dispatch_its_command_within_its_timeout(tmp_path):
    repo = make_repo(tmp_path)
    probe = ("import argparse, sys; sys.path.insert(0, 'scripts'); import dispatch, lanes, task\n"
             "args = argparse.Namespace(backend='slurm', train_command=None, gpus_per_run=2, partition=None,"
             " sbatch_option=[], address=None, env=[])\n"
             "print(lanes.training_command(args, task.load())); print(dispatch.default_time_limit())")
    result = subprocess.run([sys.executable, "-c", probe], cwd=repo.path, env=repo.env, capture_output=True,
                            text=True, timeout=60)
    command, minutes = ok(result).splitlines()
    assert command.endswith(f"--gpus 2 -- {sys.executable} train_gpt.py"), command  # no torchrun of train.py
    assert minutes == "2"  # the task's timeout of 60 s, plus a minute


MEMORISER = STANDIN.replace('val_bpb = 1.2 +', '''# the attack: read the evaluation-only file the task hides, and claim a far better score when it is there
peek = open("data/val_000.bin").read() if os.path.exists("data/val_000.bin") else ""
val_bpb = (0.1 if peek else 1.2) +''')


@pytest.mark.parametrize("sandbox", ["on", "off"])
def test_a_script_that_reads_the_hidden_files_cannot_in_the_sandbox(tmp_path, sandbox):
    repo = make_repo(tmp_path)
    ok(repo.run("setup", "--tag", "peek", "--noise-runs", "0", *(["--no-sandbox"] if sandbox == "off" else [])))
    session = json.loads((repo.path / "runs" / "session.json").read_text())
    if sandbox == "on" and session["sandbox"] != "on":
        if os.environ.get("AUTORESEARCH_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"no sandbox here: {session.get('sandbox_problem')}")
        pytest.skip(f"no sandbox here: {session.get('sandbox_problem')}")
    (repo.path / "train_gpt.py").write_text(MEMORISER)
    line = repo.run("experiment", "peek at the validation file").stdout
    # in the sandbox the hidden file is /dev/null on a mount without devices: opening it fails, so the
    # memoriser crashes instead of scoring; without the sandbox (the control) the attack works
    if sandbox == "on":
        assert "crash" in line and "Permission denied: 'data/val_000.bin'" in line, line
    else:
        assert "val_bpb 0.200000" in line, line
