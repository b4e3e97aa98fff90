"""Lanes on a real Ray cluster through the Jobs API: scripts/cluster/ray_local.sh's head and second
node, two fake GPUs each.

Skipped when no Jobs API answers at $RAY_ADDRESS (default http://127.0.0.1:8265), except in CI
(AUTORESEARCH_REQUIRE_CLUSTER=1). HOME is a temporary folder (the Ray client writes under it).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lanes_repo import FAKE_LOOP, FAKE_TRAIN, RAY_ADDRESS, LanesRepo, overlapping, pid_gone, ray_up, require_cluster, wait_for

PASS_THROUGH = ["--env", "FAKE_TRACE", "--env", "FAKE_SECONDS", "--env", "FAKE_LATER_SECONDS", "--env", "FAKE_HANG"]


HOW = "bash scripts/cluster/ray_local.sh up; export RAY_ADDRESS=http://127.0.0.1:8265"


@pytest.fixture
def repo(tmp_path):
    require_cluster("Ray", ray_up(), HOW)
    made = LanesRepo(tmp_path / "repo")
    made.since_ms = int(time.time() * 1000)  # a cluster that outlived an earlier run keeps its jobs
    return made


@pytest.fixture(scope="module")
def client():  # set up before `repo` (a wider scope comes first), so it checks the cluster too
    require_cluster("Ray", ray_up(), HOW)
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(RAY_ADDRESS)


def our_jobs(client, repo):
    """{submission id: status} of this test's jobs: their metadata names a worktree of this test, and
    they were submitted after it began (a run after `rm -rf` of pytest's folders reuses its paths)."""
    return {job.submission_id: str(job.status.value) for job in client.list_jobs()
            if str(repo.path.parent) in (job.metadata or {}).get("worktree", "")
            and (job.start_time or 0) >= repo.since_ms}


def active(jobs):
    return {name: status for name, status in jobs.items() if status in ("PENDING", "RUNNING")}


def test_four_lanes_on_four_gpus_record_every_experiment_in_its_own_lane(repo, client):
    # The baselines only (Ray starts a job in seconds, not milliseconds): four jobs at once.
    repo.env["FAKE_SECONDS"] = "4"
    repo.lanes("start", "4", "--backend", "ray", "--tag", "r", "--train-command", FAKE_TRAIN, *PASS_THROUGH,
               "--", *FAKE_LOOP, "--max-experiments", "0", "--timeout", "420")
    status = repo.wait_until_stopped(timeout=540)
    lanes = repo.lane_paths("r")
    assert status["experiments"] == 4
    runs = [run for run in repo.traces() if run["event"] == "run"]
    assert len(runs) == 4
    for lane in lanes:
        rows, records = repo.rows(lane), repo.assert_one_job_per_run(lane)
        assert len(rows) == 1 and len(records) == 1 and records[0]["state"] == "done"
        names = {record["name"] for record in records}
        assert sum(run["job"] in names for run in runs) == 1  # this lane's run came from this lane's job
        for record in records:
            assert client.get_job_info(record["name"]).metadata["worktree"] == str(lane)
        for run_log in lane.glob("runs/[0-9][0-9][0-9][0-9]-*/run.log"):
            assert "dispatch: submitted ray job" in run_log.read_text()
    # Runs at the same time never shared a GPU: (the node Ray ran the job on, CUDA_VISIBLE_DEVICES).
    for run in runs:
        run["node"] = client.get_job_info(run["job"]).driver_node_id
    for first, second in overlapping(runs):
        assert (first["node"], first["gpu"]) != (second["node"], second["gpu"])
    assert not active(our_jobs(client, repo))
    assert "4 experiments" in repo.lanes("status")


def test_two_gpus_per_run_give_each_job_two_gpus_of_one_node(repo, client):
    repo.env["FAKE_SECONDS"] = "4"
    repo.lanes("start", "2", "--backend", "ray", "--tag", "r2", "--gpus-per-run", "2", "--train-command",
               FAKE_TRAIN, *PASS_THROUGH, "--", *FAKE_LOOP, "--max-experiments", "0", "--timeout", "420")
    repo.wait_until_stopped(timeout=540)
    runs = [run for run in repo.traces() if run["event"] == "run"]
    assert len(runs) == 2
    for run in runs:
        run["node"] = client.get_job_info(run["job"]).driver_node_id
        assert sorted(run["gpu"].split(",")) == ["0", "1"]  # a node's two GPUs, both for this job
    for first, second in overlapping(runs):
        assert first["node"] != second["node"]


def start_hung_job(repo, name):
    path = repo.path.parent / name
    repo.git("worktree", "add", "-q", "--detach", str(path), "HEAD")
    return subprocess.Popen([sys.executable, "scripts/dispatch.py", "--backend", "ray", *PASS_THROUGH, "--",
                             *FAKE_TRAIN.split()], cwd=path, env=dict(repo.env, FAKE_HANG="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_a_fifth_job_waits_for_a_gpu_and_sigterm_stops_every_job(repo, client):
    dispatchers = [start_hung_job(repo, f"w{k}") for k in range(5)]
    try:
        assert wait_for(lambda: sorted(our_jobs(client, repo).values()) == ["PENDING"] + ["RUNNING"] * 4
                        and len(repo.traces()) == 4, timeout=240), our_jobs(client, repo)
        time.sleep(3)  # still waiting: a GPU is never shared
        assert sorted(our_jobs(client, repo).values()) == ["PENDING"] + ["RUNNING"] * 4
        hung = repo.traces()
        nodes = {run["job"]: client.get_job_info(run["job"]).driver_node_id for run in hung}
        assert len({(nodes[run["job"]], run["gpu"]) for run in hung}) == 4
    finally:
        # Twice, as experiment.py's stop does (the process group, then each process it finds): the
        # second lands while the first one's cancel is under way and must not cut it short.
        for process in dispatchers:
            process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        for process in dispatchers:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=60) for process in dispatchers]
    assert codes == [128 + signal.SIGTERM] * 5
    assert wait_for(lambda: not active(our_jobs(client, repo)), timeout=60), our_jobs(client, repo)
    pids = [pid for run in hung for pid in (run["pid"], run["child"])]
    assert wait_for(lambda: all(pid_gone(pid) for pid in pids), timeout=30)  # the SIGTERM-ignoring child too


def test_a_hung_run_is_stopped_at_the_experiment_timeout(repo, client):
    train = f"{sys.executable} scripts/dispatch.py --backend ray {' '.join(PASS_THROUGH)} -- {FAKE_TRAIN}"
    env = {"AUTORESEARCH_TRAIN_COMMAND": train, "FAKE_HANG": "1"}
    assert repo.run("setup", "--tag", "hang", "--no-sandbox", "--no-referee", "--noise-runs", "0",
                    env=env).returncode == 0
    # Long enough for the job to reach its script on a slow box (at 15 s it had not, in CI here).
    result = repo.run("experiment", "hangs", "--timeout", "45", env=env)
    assert result.returncode == 1 and "timeout" in result.stdout, result.stdout + result.stderr
    (record,) = repo.job_records(repo.path)
    assert record["state"] == "cancelled"
    assert our_jobs(client, repo)[record["name"]] == "STOPPED"
    hung = wait_for(lambda: repo.traces(), timeout=5)
    assert hung and wait_for(lambda: pid_gone(hung[0]["pid"]) and pid_gone(hung[0]["child"]), timeout=20)


def test_kill_9_of_the_loop_then_resume_submits_nothing_twice(repo, client):
    repo.env.update(FAKE_SECONDS="4", FAKE_LATER_SECONDS="300")  # the job orphaned below ends only if cancelled
    repo.lanes("start", "1", "--backend", "ray", "--tag", "k", "--train-command", FAKE_TRAIN, *PASS_THROUGH,
               "--", *FAKE_LOOP, "--max-experiments", "1", "--timeout", "240")
    (lane,) = repo.lane_paths("k")

    def running_job():
        if not (lane / "results.tsv").exists() or not repo.rows(lane) or not (lane / "runs" / "jobs").exists():
            return False
        return any(record["state"] == "submitted" and record.get("started_at") for record in repo.job_records(lane))

    # After the baseline, everything on the loop's side dies (loop, experiment.py, dispatch.py);
    # the job goes on running in Ray.
    assert wait_for(running_job, timeout=240)
    state = json.loads((lane / "runs" / "loop" / "state.json").read_text())
    pending = json.loads((lane / "runs" / "pending.json").read_text())
    os.killpg(state["process"]["pid"], signal.SIGKILL)
    os.killpg(pending["training_pgid"], signal.SIGKILL)
    assert active(our_jobs(client, repo))
    repo.lanes("resume")
    repo.wait_until_stopped(timeout=420)
    rows, records = repo.rows(lane), repo.assert_one_job_per_run(lane)
    assert len(rows) == 2 and rows[1][3] == "crash", rows  # recorded as interrupted, not lost
    assert len(records) == len(our_jobs(client, repo))  # the engine saw exactly the jobs recorded
    # resume's decide.py cancelled the orphaned job (Ray stops a job asynchronously)
    assert [record["reason"] for record in records if record["state"] == "cancelled"] == \
        ["its experiment was interrupted"], records
    assert wait_for(lambda: not active(our_jobs(client, repo)), timeout=30), our_jobs(client, repo)
    assert not overlapping([run for run in repo.traces() if run["event"] == "run"])
