"""Experiment tracking (scripts/tracking.py) against the real libraries: a real `mlflow server` on
127.0.0.1 (started and stopped here), read back through MLflow's client and its UI in headless
Chromium; W&B in offline mode, read back from its run folders; and a tracker that is down.

The experiments are the headless loop's, trained by the bowl (tests/fixtures/fake_train_loop/bowl.py).
"""

import html
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from loop_repo import LoopRepo, check_consistent, ok

mlflow = pytest.importorskip("mlflow", reason="the tracking group: uv sync --group tracking")
SCREENSHOT = os.environ.get("AUTORESEARCH_MLFLOW_SCREENSHOT")  # where to keep the UI's picture, if anywhere


def helper(repo, script, *args, env=None):
    return subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=repo.path, env=dict(repo.env, **(env or {})),
                          capture_output=True, text=True, timeout=300)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
                              cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              # no job runners (huey consumers, for MLflow's GenAI jobs): tracking needs
                              # none, and they took 58 CPU s of a suite run
                              env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a slow box took over 90 s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "mlflow-server.log").read_text()
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def wait_for_tracking(repo, seconds=180):
    """Until the tracking worker has drained its queue and let go of its lock."""
    queue, lock = repo.path / "runs" / "tracking" / "queue", repo.path / "runs" / "tracking" / "worker.lock"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(queue.glob("*.json")) and not worker_running(lock):
            return json.loads((repo.path / "runs" / "tracking" / "runs.json").read_text())
        time.sleep(0.5)
    log = repo.path / "runs" / "tracking" / "tracking.log"
    raise AssertionError(f"tracking queue not drained: {log.read_text()[-3000:] if log.exists() else 'no log'}")


def worker_running(lock):
    import fcntl

    if not lock.exists():
        return False
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def queue(repo, name, old, new, description):
    """A queued proposal: one line of train.py changed."""
    text = (repo.path / "train.py").read_text()
    assert text.count(old) == 1
    (repo.path / "proposals").mkdir(exist_ok=True)
    import difflib

    patch = "".join(difflib.unified_diff(text.splitlines(True), text.replace(old, new).splitlines(True),
                                         "a/train.py", "b/train.py"))
    (repo.path / "proposals" / name).write_text(json.dumps({"description": description, "patch": patch,
                                                            "hypothesis": f"{description}: closer to the optimum"}))


def test_mlflow_server_gets_one_run_per_experiment_with_params_metrics_tags_artifacts_and_links(
        tmp_path, mlflow_server):
    repo = LoopRepo(tmp_path / "repo")
    queue(repo, "1.json", "    MATRIX_LR = 0.03", "    MATRIX_LR = 0.06", "matrix lr 0.03 -> 0.06")
    queue(repo, "2.json", "WARMDOWN_RATIO = 0.5 ", "WARMDOWN_RATIO = 0.52", "warmdown 0.5 -> 0.52")  # marginal
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    ok(repo.start("--track", "mlflow", "--noise-runs", "2", "--max-experiments", "2", "--tag", "night", env=env))
    rows = check_consistent(repo)
    assert rows[1][3] == "keep"
    ok(helper(repo, "decide.py", "backtrack", rows[0][0], env=env))
    runs = wait_for_tracking(repo)
    assert not [entry for entry in runs.values() if entry.get("error")], runs

    client = mlflow.tracking.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("autoresearch/night")
    found = client.search_runs([experiment.experiment_id], max_results=100)
    by_folder = {run.data.tags["run"]: run for run in found}
    summaries = {path.parent.name: json.loads(path.read_text()) for path in (repo.path / "runs").glob("0*/summary.json")}
    assert set(by_folder) == set(summaries)  # every run: noise, experiments, confirmations
    experiments = {name: s for name, s in summaries.items() if s.get("kind", "experiment") == "experiment"}
    assert len(experiments) == 3
    for row, (name, summary) in zip(rows, sorted(experiments.items())):
        run = by_folder[name]
        assert run.data.tags["commit"] == row[0] and run.data.tags["lane"] == "main"
        assert run.data.tags["verdict"] == summary["verdict"]
        assert run.data.metrics["val_bpb"] == pytest.approx(float(row[1]), abs=1e-6)
        assert run.data.params["MATRIX_LR"] == ("0.03" if row is rows[0] else "0.06")  # the third builds on the second
        assert run.data.params["WINDOW_PATTERN"] == "SSSL" and run.data.params["profile"] == "cpu"
        assert run.data.params["description"] == summary["description"]
        assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [4.0]
        artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
        assert "summary.json" in artifacts and ("diff.patch" in artifacts) == bool(summary["diff"])
        assert run.info.status == "FINISHED"
    baseline, kept = (by_folder[name] for name in sorted(experiments)[:2])
    assert kept.data.tags["status"] == "backtracked" and kept.data.tags["backtracked_to"] == rows[0][0]
    assert baseline.data.tags["status"] == "keep"
    assert "closer to the optimum" in kept.data.params["hypothesis"]
    noise = [run for run in found if run.data.tags["kind"] == "noise"]
    assert len(noise) == 2 and {run.data.tags["mlflow.parentRunId"] for run in noise} == {baseline.info.run_id}
    confirmations = [name for name, summary in summaries.items() if summary.get("kind") == "confirmation"]
    assert len(confirmations) == 1 and "[mean of 2 runs]" in rows[2][4]
    for name, summary in summaries.items():
        if summary.get("kind") == "confirmation":
            parent = by_folder[summary["confirms"]]
            assert by_folder[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
    screenshot_lists_the_runs(mlflow_server, experiment.experiment_id, [by_folder[name] for name in experiments],
                              tmp_path)


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is needed for the MLflow UI check: apt-get install -y chromium")


def browse(url, tmp_path, *args):
    profile = tmp_path / f"chromium-{time.monotonic_ns()}"
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--virtual-time-budget=15000", "--window-size=1600,1000", *args, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def screenshot_lists_the_runs(server, experiment_id, runs, tmp_path):
    url = f"{server}/#/experiments/{experiment_id}/runs"
    dom = browse(url, tmp_path, "--dump-dom").stdout
    for run in runs:
        assert html.escape(run.info.run_name, quote=False) in dom, (run.info.run_name, dom[-3000:])
    picture = tmp_path / "mlflow.png"
    browse(url, tmp_path, f"--screenshot={picture}")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if SCREENSHOT:
        shutil.copyfile(picture, SCREENSHOT)


def test_wandb_offline_run_folders_hold_the_history_and_the_summary(tmp_path):
    repo = LoopRepo(tmp_path / "repo")
    env = {"WANDB_API_KEY": "", "HOME": str(tmp_path / "home")}
    ok(repo.start("--track", "wandb", "--max-experiments", "1", "--tag", "offline", env=env))
    rows = check_consistent(repo)
    runs = wait_for_tracking(repo)
    assert not [entry for entry in runs.values() if entry.get("error")], runs
    folders = sorted((repo.path / "runs" / "wandb" / "wandb").glob("offline-run-*"))
    summaries = {path.parent.name: json.loads(path.read_text()) for path in (repo.path / "runs").glob("0*/summary.json")}
    assert set(runs) == {f"wandb:{name}" for name in summaries}
    assert {run_id_of(folder) for folder in folders} == {entry["run_id"] for entry in runs.values()}
    experiments = sorted(name for name, summary in summaries.items() if summary.get("kind", "experiment") == "experiment")
    for name, row in zip(experiments, rows, strict=True):
        run_id = runs[f"wandb:{name}"]["run_id"]
        mine = [folder for folder in folders if run_id_of(folder) == run_id]  # the first sync, then the decision's
        records = [record for folder in mine for record in wandb_records(folder / f"run-{run_id}.wandb")]
        history = [json.loads(item.value_json) for record in records if record.WhichOneof("record_type") == "history"
                   for item in record.history.item if key_of(item) == "train_loss"]
        assert history == [4.0]
        summary = {key_of(item): json.loads(item.value_json) for record in records
                   if record.WhichOneof("record_type") == "summary" for item in record.summary.update}
        assert summary["val_bpb"] == pytest.approx(float(row[1]), abs=1e-6)
        assert summary["tag_status"] == row[3] and summary["tag_commit"] == row[0]
        config = {key_of(item): json.loads(item.value_json) for record in records
                  if record.WhichOneof("record_type") == "run" for item in record.run.config.update}
        assert config["WINDOW_PATTERN"] == "SSSL" and "MATRIX_LR" in config, config
        assert config["MATRIX_LR"] == 0.03 or row is not rows[0]


def key_of(item):
    return item.key or "/".join(item.nested_key)


def wandb_records(path):
    """The records of an offline run's .wandb file: W&B's header, then a LevelDB-style log (32 KiB
    blocks of chunks: crc32, length, type) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    offset, records, pending = 7, [], b""
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        length, kind = int.from_bytes(data[offset + 4:offset + 6], "little"), data[offset + 6]
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def run_id_of(folder):
    """offline-run-<time>-<id>[-N]/run-<id>.wandb: the run's id."""
    return next(folder.glob("run-*.wandb")).stem[len("run-"):]


def test_a_tracker_that_is_down_costs_one_warning_line_and_a_note(tmp_path):
    repo = LoopRepo(tmp_path / "repo")
    port = free_port()  # nothing listens there
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    setup = helper(repo, "setup.py", "--tag", "down", "--noise-runs", "0", "--no-referee", "--track", "mlflow",
                            env=env)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    timings = {}
    for label, extra in (("off", {"MLFLOW_TRACKING_URI": ""}), ("down", env)):
        if label == "off":
            session = json.loads((repo.path / "runs" / "session.json").read_text())
            session["track"] = None
            (repo.path / "runs" / "session.json").write_text(json.dumps(session))
        else:
            session["track"] = "mlflow"
            (repo.path / "runs" / "session.json").write_text(json.dumps(session))
        started = time.monotonic()
        result = helper(repo, "experiment.py", f"run with tracking {label}", env=extra)
        timings[label] = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        warnings = [line for line in result.stderr.splitlines() if line.startswith("tracking:")]
        assert len(warnings) == (1 if label == "down" else 0), result.stderr
        decided = helper(repo, "decide.py", "keep" if label == "off" else "discard", env=extra)
        assert decided.returncode == 0, decided.stdout + decided.stderr
    summaries = sorted((repo.path / "runs").glob("0*/summary.json"))
    down = json.loads(summaries[-1].read_text())
    assert down["tracking"]["state"] == "not recorded" and "unreachable" in down["tracking"]["problem"]
    assert down["status"] == "ok" and json.loads(summaries[0].read_text())["tracking"] is None
    assert timings["down"] - timings["off"] < 1.0, timings
    assert [row[3] for row in repo.rows()] == ["keep", "discard"]


def test_a_server_that_never_answers_does_not_slow_the_experiment_and_the_worker_gives_up(tmp_path):
    """It accepts the connection (the quick check passes) and then says nothing: the worker, not the
    experiment, waits, and records the failure in runs/tracking/."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    repo = LoopRepo(tmp_path / "repo")
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{listener.getsockname()[1]}", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    try:
        setup = helper(repo, "setup.py", "--tag", "silent", "--noise-runs", "0", "--no-referee", "--track", "mlflow",
                       env=env)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        started = time.monotonic()
        result = helper(repo, "experiment.py", "baseline", env=env)
        seconds = time.monotonic() - started
        assert result.returncode == 0 and "tracking:" not in result.stderr, result.stdout + result.stderr
        run_dir = next((repo.path / "runs").glob("0*/summary.json")).parent
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["tracking"]["state"] == "queued"
        assert seconds < 10, seconds  # training the bowl takes well under a second; the worker is detached
        runs = wait_for_tracking(repo, seconds=150)
        assert "not recorded" in (repo.path / "runs" / "tracking" / "tracking.log").read_text()
        assert runs[f"mlflow:{run_dir.name}"]["error"]
    finally:
        listener.close()


def test_an_unknown_tracker_is_refused_at_setup_before_anything_changes(tmp_path):
    repo = LoopRepo(tmp_path / "repo")
    result = helper(repo, "setup.py", "--tag", "bad", "--noise-runs", "0", env={"AUTORESEARCH_TRACK": "tensorboard"})
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "--track tensorboard: choose mlflow, wandb or none" in result.stderr
    assert repo.git("branch", "--list", "autoresearch/bad") == "" and not (repo.path / "runs" / "session.json").exists()
    off = helper(repo, "setup.py", "--tag", "off", "--noise-runs", "0", "--track", "none",
                 env={"AUTORESEARCH_TRACK": "tensorboard"})
    assert off.returncode == 0, off.stderr
    assert json.loads((repo.path / "runs" / "session.json").read_text())["track"] is None


def test_lanes_record_into_one_local_mlflow_store_one_experiment_per_lane(tmp_path):
    from lanes_repo import LanesRepo

    lanes = LanesRepo(tmp_path / "repo")
    bowl = Path(__file__).resolve().parent / "fixtures" / "fake_train_loop" / "bowl.py"
    lanes.lanes("start", "2", "--backend", "local", "--tag", "tracked", "--track", "mlflow",
                "--train-command", f"{sys.executable} {bowl}",
                "--", "--no-referee", "--noise-runs", "0", "--max-experiments", "2")
    assert lanes.wait_until_stopped(timeout=120)["experiments"] == 6
    folders = {}
    for k, lane in enumerate(lanes.lane_paths("tracked")):
        runs = wait_for_tracking(type("Lane", (), {"path": lane}))
        folders[k] = {path.parent.name for path in (lane / "runs").glob("0*/summary.json")}  # confirmations too
        assert set(runs) == {f"mlflow:{name}" for name in folders[k]}
        assert not [entry for entry in runs.values() if entry.get("error")], runs
        assert not (lane / "runs" / "mlflow.db").exists()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{lanes.path / 'runs' / 'mlflow.db'}")
    for k in (0, 1):
        experiment = client.get_experiment_by_name(f"autoresearch/tracked-lane{k}")
        found = client.search_runs([experiment.experiment_id])
        assert {run.data.tags["run"] for run in found} == folders[k]
        assert {run.data.tags["lane"] for run in found} == {f"lane{k}"}
        assert {run.data.tags["status"] for run in found if run.data.tags["kind"] == "experiment"} <= {"keep", "discard"}
        assert all("summary.json" in {a.path for a in client.list_artifacts(run.info.run_id)} for run in found)
