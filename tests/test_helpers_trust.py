"""Results a researcher can trust, through the helpers' command lines: the noise floor,
confirmation of marginal wins, changes that are never a keep, the referee, the held-out split and
the sandbox.

Same set-up as test_helpers_cli.py: a real git repository in a temporary folder, the fake training
scripts of tests/fixtures/fake_train, and prepare_standin.py as the pinned prepare.py, whose
`score` reads the true value the fake wrote into its "model". noisy.py gives val_bpb = 1.0 -
IMPROVEMENT + noise, with the noise of each seed fixed by a LUCK table in train.py, so every
number below is exact.
"""

import json
import socket
import threading

import pytest

from test_helpers_cli import fake, ok, refused, repo  # noqa: F401  (repo is a fixture)

NOISY = fake("noisy.py")
BASELINE_LUCK = "LUCK = {42: 0.0, 43: 0.001, 44: -0.001}\n"  # baseline runs 1.0, 1.001, 0.999: noise 0.001


def write_train(repo, *lines):
    (repo.path / "train.py").write_text("DEPTH = 8\nLR = 0.04\n" + "".join(lines))


def session_json(repo):
    return json.loads((repo.path / "runs" / "session.json").read_text())


def experiment(repo, description, *args, env=None):
    return repo.run("experiment", description, *args, train=NOISY, env=env)


@pytest.fixture
def measured(repo):  # noqa: F811
    """A session whose noise was measured at setup (2 runs) and whose baseline is kept: best 1.0, noise 0.001."""
    write_train(repo, BASELINE_LUCK)
    repo.git("commit", "-q", "-am", "a baseline with known luck")
    ok(repo.run("setup", "--tag", "trust", train=NOISY), lines=2)
    ok(repo.run("experiment", "baseline", train=NOISY))
    ok(repo.run("decide", "keep"))
    return repo


# ---------------------------------------------------------------------------
# Noise


def test_setup_measures_the_noise_floor_records_and_prints_it(repo):  # noqa: F811
    write_train(repo, BASELINE_LUCK)
    repo.git("commit", "-q", "-am", "a baseline with known luck")
    output = ok(repo.run("setup", "--tag", "trust", train=NOISY), lines=2)
    assert "noise 0.001414 (measured: 2 runs of 1 commit)" in output  # sd of 1.001 and 0.999
    session = session_json(repo)
    assert session["noise_bpb"] == pytest.approx(0.001414, abs=1e-6)
    assert [(sample["seed"], sample["val_bpb"]) for sample in session["noise_runs"]] == [(43, 1.001), (44, 0.999)]
    for number in ("0001", "0002"):
        summary = repo.summary(number)
        assert summary["kind"] == "noise" and summary["status"] == "ok"
        assert not list((repo.path / "runs").glob(f"{number}-*/out/model.pt2"))  # scored, then deleted
        assert summary["referee"]["status"] == "verified"
    assert "noise 0.001414 (measured: 2 runs of 1 commit)" in ok(repo.run("status"), lines=3)

    line = ok(repo.run("experiment", "baseline", train=NOISY))  # seed 42: 1.0, the third sample
    assert "val_bpb 1.000000 mean of 3 runs (baseline; noise 0.001000, re-measured with this run)" in line
    assert session_json(repo)["noise_bpb"] == pytest.approx(0.001) and len(session_json(repo)["noise_runs"]) == 3
    ok(repo.run("decide", "keep"))
    assert repo.rows()[-1][1:] == ["1.000000", "2.0", "keep", "baseline [mean of 3 runs]"]

    output = ok(repo.run("setup", "--measure-noise", "--noise-runs", "1", train=NOISY))
    assert "after 1 more run" in output and len(session_json(repo)["noise_runs"]) == 4  # seed 45: a hashed draw


def test_experiment_prints_the_difference_in_noise_units(measured):
    write_train(measured, "IMPROVEMENT = 0.005\n", BASELINE_LUCK)
    line = ok(experiment(measured, "clearly better"))
    assert "val_bpb 0.995000 (-0.005000 vs best 1.000000, -5.0 noise)" in line
    assert line.rstrip().endswith(": improved (next: decide.py keep)")
    ok(measured.run("decide", "keep"))


def test_a_marginal_win_that_holds_is_confirmed_on_the_mean_and_kept(measured):
    write_train(measured, "IMPROVEMENT = 0.003\n", "LUCK = {42: 0.001, 43: -0.0005}\n")
    line = ok(experiment(measured, "real but small"))  # seed 42: 0.998, 2 noise units better
    assert "(-0.002000 vs best 1.000000, -2.0 noise)" in line and "marginal (next: experiment.py --confirm)" in line
    assert json.loads(ok(measured.run("status", "--json")))["pending"]["message"].count("--confirm") == 1
    refused(measured.run("decide", "keep"), "2.0 noise units", "uv run scripts/experiment.py --confirm")

    line = ok(measured.run("experiment", "--confirm", train=NOISY))  # seed 43: 0.9965, mean 0.99725
    assert "val_bpb 0.997250 mean of 2 runs (-0.002750 vs best 1.000000, -2.8 noise)" in line
    assert "confirmed (next: decide.py keep)" in line
    experiment_summary, confirmation = measured.summary("0004"), measured.summary("0005")
    assert confirmation["kind"] == "confirmation" and confirmation["confirms"].startswith("0004-")
    assert confirmation["seed"] == 43 and confirmation["val_bpb"] == pytest.approx(0.9965)
    assert experiment_summary["confirmations"] == [next((measured.path / "runs").glob("0005-*")).name]
    assert experiment_summary["referee"] == "verified" and experiment_summary["runs"] == 2
    pending = json.loads((measured.path / "runs" / "pending.json").read_text())
    assert pending["confirmation"]["started_at"] <= confirmation["started_at"]  # status times the confirmation from it
    refused(measured.run("experiment", "--confirm", train=NOISY), "already confirmed once (confirmed)")
    ok(measured.run("decide", "keep"))
    assert measured.rows()[-1][1:] == ["0.997250", "2.0", "keep", "real but small [mean of 2 runs]"]


def test_a_marginal_fluke_is_not_confirmed_and_cannot_be_kept(measured):
    write_train(measured, "IMPROVEMENT = 0.0\n", "LUCK = {42: -0.002, 43: 0.0005}\n")
    assert "marginal" in ok(experiment(measured, "lucky draw"))
    line = ok(measured.run("experiment", "--confirm", train=NOISY))  # mean 0.99925: 0.75 noise units
    assert "mean of 2 runs" in line and "not confirmed (next: decide.py discard)" in line
    assert measured.summary("0004")["referee"] == "verified"  # every run is scored by the referee
    refused(measured.run("decide", "keep"), "mean of 2 runs beat the best by 0.8 noise units, under the 2.12")
    refused(measured.run("experiment", "--confirm", train=NOISY), "already confirmed once")
    ok(measured.run("decide", "discard"))
    assert measured.rows()[-1][1:4] == ["0.999250", "2.0", "discard"]
    assert not list((measured.path / "runs").glob("*/out/model.pt2"))[1:]  # only the kept baseline's model is left
    assert list((measured.path / "runs").glob("0003-*/out/model.pt2"))


@pytest.mark.parametrize("line, verdict", [
    ("SEED_OFFSET = 8\n", "cosmetic"),  # seed 50, whose luck is 10 noise units
    ("print('learning rate', LR)\n", "cosmetic"),
    ("# a comment that changes nothing\n", "cosmetic"),
    (None, "rerun"),
])
def test_a_seed_print_comment_or_empty_change_is_never_kept(repo, line, verdict):  # noqa: F811
    write_train(repo, "LUCK = {42: 0.0, 50: -0.01}\n")
    repo.git("commit", "-q", "-am", "start")
    ok(repo.run("setup", "--tag", "never", "--noise-runs", "0"))
    ok(experiment(repo, "baseline"))
    ok(repo.run("decide", "keep"))
    if line:
        with open(repo.path / "train.py", "a") as f:
            f.write(line)
    result = ok(experiment(repo, "try luck"))
    assert f": {verdict} (next: decide.py discard)" in result
    message = refused(repo.run("decide", "keep", "--force"), "never a keep", "--force cannot override")
    assert ("changes nothing" if verdict == "rerun" else "only touches seeds, printing") in message
    ok(repo.run("decide", "discard"))


# ---------------------------------------------------------------------------
# The referee


def test_a_monkeypatched_evaluation_is_invalid_and_reset(repo):  # noqa: F811
    ok(repo.run("setup", "--tag", "ref", "--noise-runs", "0"))
    ok(repo.experiment("baseline", 1.0))
    ok(repo.run("decide", "keep"))
    base = repo.head()
    result = repo.experiment("cache the eval", train=fake("cheat.py", 0.5, 1.0))
    assert result.returncode == 1 and len(result.stdout.splitlines()) == 2
    assert "invalid (referee): train.py printed val_bpb 0.500000, but the referee scored its saved model 1.000000" \
        in result.stdout
    assert repo.summary("0002")["status"] == "invalid"
    assert "recorded as invalid (not keep: it is invalid)" in ok(repo.run("decide", "keep", "--force"))
    assert repo.rows()[-1][1:4] == ["0.000000", "0.0", "invalid"] and repo.head() == base
    assert not list((repo.path / "runs").glob("0002-*/out/model.pt2"))
    status = ok(repo.run("status"), lines=None)
    assert "invalid 1" in status


@pytest.mark.parametrize("where", ["own", "referee"])
def test_a_model_that_looks_ahead_is_invalid(repo, where):  # noqa: F811
    ok(repo.run("setup", "--tag", "causal", "--noise-runs", "0"))
    result = repo.experiment("peek at the next token", train=fake("noncausal.py", *(["own"] if where == "own" else [])))
    assert result.returncode == 1
    kind = "causality" if where == "own" else "referee"
    assert f"invalid ({kind}): invalid: the model is not causal" in result.stdout
    ok(repo.run("decide", "discard"))
    assert repo.rows()[-1][3] == "invalid"


def test_an_unverified_result_is_kept_only_by_force(repo):  # noqa: F811
    ok(repo.run("setup", "--tag", "unverified", "--noise-runs", "0"))
    with open(repo.path / "train.py", "a") as f:
        f.write("IDEA = 'unexportable'\n")
    line = ok(repo.run("experiment", "unexportable", train=fake("success.py", 1.0), env={"FAKE_EXPORT": "0"}))
    assert "baseline, unverified: no model.pt2 in the run folder (next: decide.py discard)" in line
    refused(repo.run("decide", "keep"), "unverified", "torch.export")
    assert "(forced)" in ok(repo.run("decide", "keep", "--force"))
    assert repo.rows()[-1][3:] == ["keep", "unexportable [forced keep]"]


def test_no_referee_session_keeps_without_re_scoring(repo):  # noqa: F811
    ok(repo.run("setup", "--tag", "off", "--noise-runs", "0", "--no-referee"))
    with open(repo.path / "train.py", "a") as f:
        f.write("IDEA = 'x'\n")
    ok(repo.run("experiment", "baseline", train=fake("success.py", 1.0), env={"FAKE_EXPORT": "0"}))
    assert repo.summary("0001")["referee"] == "off"
    ok(repo.run("decide", "keep"))
    assert "referee off" in ok(repo.run("status"), lines=None)


def test_a_helper_changed_after_the_experiment_stops_the_keep(measured):
    write_train(measured, "IMPROVEMENT = 0.01\n")
    ok(experiment(measured, "better"))
    with open(measured.path / "scripts" / "decide.py", "a") as f:
        f.write("# keep everything\n")
    with open(measured.path / "scripts" / "common.py", "a") as f:
        f.write("# and trust every number\n")
    refused(measured.run("decide", "keep"), "scripts/common.py no longer matches the hash pinned at setup",
            "git checkout")


# ---------------------------------------------------------------------------
# The held-out split


def test_each_new_best_is_scored_on_the_test_split_and_never_printed(repo):  # noqa: F811
    ok(repo.run("setup", "--tag", "heldout", "--noise-runs", "0"))
    outputs = [ok(repo.experiment("baseline", 1.0)), ok(repo.run("decide", "keep")),
               ok(repo.experiment("better", 0.99)), ok(repo.run("decide", "keep")),
               ok(repo.experiment("worse", 1.2)), ok(repo.run("decide", "discard"))]
    lines = (repo.path / "train.py").read_text().splitlines()
    (repo.path / "train.py").write_text("\n".join(lines[1:]) + "\n")  # shorter, within the noise: kept, no new best
    outputs += [ok(repo.experiment("drop DEPTH", 0.9905, edit=False)), ok(repo.run("decide", "keep"))]
    outputs += [ok(repo.run("status"), lines=None), ok(repo.run("status", "--json"))]
    assert not any("test" in output.lower() for output in outputs), outputs
    records = json.loads((repo.path / "runs" / "heldout.json").read_text())
    assert [(r["id"], r["val_bpb"], r["test_bpb"]) for r in records] == [("0001", 1.0, 1.01), ("0002", 0.99, 1.0)]
    assert records[1]["gap"] == pytest.approx(0.01)
    report = ok(repo.run("status", "--report"), lines=None)
    assert "held-out test split" in report and "0002  " in report and "+0.010000" in report
    assert "not widening" in report
    assert json.loads(ok(repo.run("status", "--json", "--report")))["held_out"][0]["test_bpb"] == 1.01


# ---------------------------------------------------------------------------
# The sandbox


def sandboxed_session(repo, tag, *extra):  # noqa: F811
    ok(repo.run("setup", "--tag", tag, "--noise-runs", "0", *extra), lines=None)
    state = session_json(repo)
    if state["sandbox"] == "unavailable":
        pytest.skip(f"the kernel forbids the sandbox here: {state['sandbox_problem']}")
    return state


class Listener:
    """A TCP server on loopback that records what reaches it."""

    def __enter__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.port, self.received, self.done = self.server.getsockname()[1], [], threading.Event()
        self.thread = threading.Thread(target=self.accept, daemon=True)
        self.thread.start()
        return self

    def accept(self):
        while not self.done.is_set():
            try:
                connection, _ = self.server.accept()
            except OSError:
                continue
            connection.settimeout(5)
            self.received.append(connection.recv(100))
            connection.close()

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(timeout=10)
        self.server.close()


@pytest.mark.parametrize("sandbox", [True, False])
def test_training_cannot_open_a_socket_in_the_sandbox(repo, sandbox):  # noqa: F811
    sandboxed_session(repo, "net", *([] if sandbox else ["--no-sandbox"]))
    with Listener() as listener:
        result = repo.experiment("phone home", train=fake("escape.py", "socket", listener.port))
    if sandbox:
        # the sandbox's network namespace has only its own loopback: nobody listens there
        assert result.returncode == 1 and ("crash (exception): OSError" in result.stdout
                                           or "crash (exception): ConnectionRefusedError" in result.stdout), result.stdout
        assert listener.received == []
    else:  # the same script, unsandboxed: the test would notice a sandbox that lets it through
        assert result.returncode == 0, result.stdout
        assert listener.received == [b"escaped\n"]


def test_training_writes_only_its_out_folder_and_a_private_temp_in_the_sandbox(repo, tmp_path):  # noqa: F811
    sandboxed_session(repo, "files")
    for target in (repo.path / "escaped.txt", repo.path / "runs" / "session.json",
                   repo.cache / "prepared" / "escaped.txt"):
        result = repo.experiment(f"write {target.name}", train=fake("escape.py", "write", target))
        assert result.returncode == 1 and "Read-only file system" in result.stdout, result.stdout
        ok(repo.run("decide", "discard"))
    assert not (repo.path / "escaped.txt").exists() and not (repo.cache / "prepared" / "escaped.txt").exists()
    assert json.loads((repo.path / "runs" / "session.json").read_text())["tag"] == "files"
    result = repo.experiment("tamper with the referee", train=fake("escape.py", "tamper"))
    assert result.returncode == 1 and "Read-only file system" in result.stdout
    ok(repo.run("decide", "discard"))
    # /tmp is the sandbox's own tmpfs: the write succeeds there and never reaches this machine's /tmp
    line = ok(repo.experiment("write to temp", train=fake("escape.py", "write", tmp_path / "scratch.txt")))
    assert "baseline" in line and not (tmp_path / "scratch.txt").exists()
    assert repo.summary("0005")["sandbox"] == "on" and repo.summary("0005")["referee"] == "verified"


def test_without_the_sandbox_a_rewritten_referee_makes_the_run_invalid(repo):  # noqa: F811
    ok(repo.run("setup", "--tag", "tamper", "--noise-runs", "0", "--no-sandbox"))
    result = repo.experiment("tamper with the referee", train=fake("escape.py", "tamper"))
    assert result.returncode == 1
    assert "invalid (tampering): after training, prepare.py no longer matches the hash pinned" in result.stdout
    assert "sandbox off" in ok(repo.run("status"), lines=None)
