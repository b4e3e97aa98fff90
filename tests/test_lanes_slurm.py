"""Lanes on a real SLURM cluster: scripts/cluster/slurm_local.sh's two nodes with two fake GPUs each.

Skipped when no cluster answers (sinfo), except in CI (AUTORESEARCH_REQUIRE_CLUSTER=1). Training
is the fast fake tests/fixtures/cluster/lane_train.py, sent through scripts/dispatch.py by each
lane's loop, exactly as a researcher's run would be.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lanes_repo import FAKE_LOOP, FAKE_TRAIN, LanesRepo, overlapping, pid_gone, require_cluster, slurm_up, wait_for


@pytest.fixture
def repo(tmp_path):
    require_cluster("SLURM", slurm_up(), "sudo bash scripts/cluster/slurm_local.sh up; "
                    "export SLURM_CONF=/tmp/autoresearch-slurm/slurm.conf")
    return LanesRepo(tmp_path / "repo")


def squeue(*args):
    return subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, check=True).stdout.split("\n")


def our_jobs(repo):
    """(job id, state, name) of the cluster's jobs that belong to this test's lanes."""
    jobs = [line.split() for line in squeue("-o", "%i %T %j %Z") if str(repo.path.parent) in line]
    return [(job[0], job[1], job[2]) for job in jobs]


def test_four_lanes_on_four_gpus_record_every_experiment_in_its_own_lane(repo):
    repo.lanes("start", "4", "--backend", "slurm", "--tag", "s", "--train-command", FAKE_TRAIN,
               "--", *FAKE_LOOP, "--max-experiments", "1", "--timeout", "180")
    status = repo.wait_until_stopped(timeout=360)
    lanes = repo.lane_paths("s")
    assert len(lanes) == 4 and status["experiments"] == 8  # baseline + 1 per lane
    runs = [run for run in repo.traces() if run["event"] == "run"]
    assert len(runs) >= 8  # and a confirmation run where a gain was within the noise
    for lane in lanes:
        rows = repo.rows(lane)
        assert len(rows) == 2 and rows[0][4] == "baseline"
        assert repo.git("branch", "--show-current", cwd=lane) == f"autoresearch/s-{lane.name}"
        # Every run of this lane trained in this lane's worktree, as one job each, none submitted twice.
        records = repo.assert_one_job_per_run(lane)
        assert sum(Path(run["cwd"]) == lane for run in runs) == len(records)
        assert all(record["state"] == "done" for record in records)
        for run_log in lane.glob("runs/[0-9][0-9][0-9][0-9]-*/run.log"):
            text = run_log.read_text()
            assert "dispatch: submitted slurm job" in text and "val_bpb:" in text
    # Four GPUs, four lanes: runs at the same time never shared a (node, GPU).
    assert all(run["gpu"] in ("0", "1") and run["node"] in ("n1", "n2") for run in runs)
    for first, second in overlapping(runs):
        assert (first["node"], first["gpu"]) != (second["node"], second["gpu"])
    assert not our_jobs(repo)
    one_view = repo.lanes("status")
    assert "8 experiments" in one_view and "best" in one_view
    assert "4 lanes" in repo.lanes("plot") and (repo.path / "runs" / "lanes" / "s-progress.png").exists()


def test_two_gpus_per_run_give_each_job_both_gpus_of_a_node(repo):
    repo.lanes("start", "2", "--backend", "slurm", "--tag", "s2", "--gpus-per-run", "2", "--train-command",
               FAKE_TRAIN, "--", *FAKE_LOOP, "--max-experiments", "0", "--timeout", "180")
    repo.wait_until_stopped(timeout=360)
    runs = [run for run in repo.traces() if run["event"] == "run"]
    assert len(runs) == 2
    assert all(sorted(run["gpu"].split(",")) == ["0", "1"] for run in runs)  # --gres=gpu:2 on one node
    for first, second in overlapping(runs):
        assert first["node"] != second["node"]


def start_hung_job(repo, name):
    """dispatch.py in a worktree of its own (one job in flight per worktree), training that hangs."""
    path = repo.path.parent / name
    repo.git("worktree", "add", "-q", "--detach", str(path), "HEAD")
    env = dict(repo.env, FAKE_HANG="1")
    return subprocess.Popen([sys.executable, "scripts/dispatch.py", "--backend", "slurm", "--",
                             *FAKE_TRAIN.split()], cwd=path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def test_a_fifth_job_waits_for_a_gpu_and_sigterm_cancels_every_job(repo):
    dispatchers = [start_hung_job(repo, f"w{k}") for k in range(5)]
    try:
        states = wait_for(lambda: sorted(state for _id, state, _name in our_jobs(repo))
                          if len(our_jobs(repo)) == 5 and sum(s == "RUNNING" for _i, s, _n in our_jobs(repo)) == 4
                          else None, timeout=180)
        assert states == ["PENDING", "RUNNING", "RUNNING", "RUNNING", "RUNNING"], our_jobs(repo)
        time.sleep(3)  # still waiting: a GPU is never shared
        assert sorted(state for _id, state, _name in our_jobs(repo)).count("PENDING") == 1
        hung = wait_for(lambda: [run for run in repo.traces() if run["event"] == "hang"]
                        if len(repo.traces()) == 4 else None, timeout=90)
        assert len({(run["node"], run["gpu"]) for run in hung}) == 4
    finally:
        for process in dispatchers:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=30) for process in dispatchers]
    assert codes == [128 + signal.SIGTERM] * 5
    assert wait_for(lambda: not our_jobs(repo), timeout=30), our_jobs(repo)
    pids = [pid for run in hung for pid in (run["pid"], run["child"])]
    assert wait_for(lambda: all(pid_gone(pid) for pid in pids), timeout=30)  # the SIGTERM-ignoring child too


def test_a_hung_run_is_cancelled_at_the_experiment_timeout(repo):
    train = f"{sys.executable} scripts/dispatch.py --backend slurm -- {FAKE_TRAIN}"
    env = {"AUTORESEARCH_TRAIN_COMMAND": train, "FAKE_HANG": "1"}
    assert repo.run("setup", "--tag", "hang", "--no-sandbox", "--no-referee", "--noise-runs", "0",
                    env=env).returncode == 0
    started = time.monotonic()
    result = repo.run("experiment", "hangs", "--timeout", "8", env=env)
    assert result.returncode == 1 and "timeout" in result.stdout, result.stdout + result.stderr
    assert time.monotonic() - started < 8 + 5 + 5
    (record,) = repo.job_records(repo.path)
    assert record["state"] == "cancelled"
    assert wait_for(lambda: not our_jobs(repo), timeout=20), our_jobs(repo)
    (hung,) = repo.traces()
    assert wait_for(lambda: pid_gone(hung["pid"]) and pid_gone(hung["child"]), timeout=20)


def test_kill_9_of_the_loop_then_resume_submits_nothing_twice(repo):
    repo.env["FAKE_SECONDS"] = "3"
    repo.lanes("start", "2", "--backend", "slurm", "--tag", "k", "--train-command", FAKE_TRAIN,
               "--", *FAKE_LOOP, "--max-experiments", "2", "--timeout", "180")
    lanes = repo.lane_paths("k")

    def loop_pid(lane):
        return (json.loads((lane / "runs" / "loop" / "state.json").read_text()).get("process") or {}).get("pid")

    def running_job(lane):
        records = repo.job_records(lane) if (lane / "runs" / "jobs").exists() else []
        return any(record["state"] == "submitted" and record.get("started_at") for record in records)

    # Lane 0: only the loop dies; experiment.py and dispatch.py carry on with the job.
    # Lane 1, after its baseline: the loop's process group dies, and dispatch.py's too (everything
    # on the login node), while the job goes on running on the cluster.
    assert wait_for(lambda: running_job(lanes[0]), timeout=180)
    os.kill(loop_pid(lanes[0]), signal.SIGKILL)
    assert wait_for(lambda: (lanes[1] / "results.tsv").exists() and repo.rows(lanes[1]) and running_job(lanes[1]),
                    timeout=180)
    pending = json.loads((lanes[1] / "runs" / "pending.json").read_text())
    os.killpg(loop_pid(lanes[1]), signal.SIGKILL)
    os.killpg(pending["training_pgid"], signal.SIGKILL)
    time.sleep(1)
    assert len(our_jobs(repo)) >= 1  # the orphaned job still runs on the cluster
    repo.lanes("resume")
    repo.wait_until_stopped(timeout=360)
    for lane in lanes:
        rows, records = repo.rows(lane), repo.assert_one_job_per_run(lane)
        assert len(rows) == 3, rows
        assert all(record["state"] in ("done", "cancelled") for record in records)
        lane_runs = [run for run in repo.traces() if run["event"] == "run" and Path(run["cwd"]) == lane]
        assert not overlapping(lane_runs)  # never two runs of one lane at once
    assert [row[3] for row in repo.rows(lanes[0])].count("crash") == 0  # its job was followed to the end
    assert [row[3] for row in repo.rows(lanes[1])].count("crash") == 1  # recorded as interrupted, not lost
    assert not our_jobs(repo)
