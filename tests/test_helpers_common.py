"""scripts/common.py's pure parts: the summary parser, triage, the ledger format and the keep rule."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import common  # noqa: E402
import runner  # noqa: E402

SUMMARY = """step 00950 | loss 3.2
---
val_bpb:          0.997900
training_seconds: 300.1
peak_vram_mb:     45060.2
num_steps:        953
gpu:              NVIDIA H100 80GB HBM3
"""


def test_parse_summary_reads_every_key_with_numbers_as_numbers():
    metrics = common.parse_summary(SUMMARY)
    assert metrics == {"val_bpb": 0.9979, "training_seconds": 300.1, "peak_vram_mb": 45060.2,
                       "num_steps": 953, "gpu": "NVIDIA H100 80GB HBM3"}
    assert isinstance(metrics["num_steps"], int)


def test_parse_summary_uses_the_last_block_and_needs_val_bpb():
    assert common.parse_summary("---\nval_bpb: 2.0\n" + SUMMARY)["val_bpb"] == 0.9979
    assert common.parse_summary("---\ntraining_seconds: 3\n") == {}
    assert common.parse_summary("val_bpb: 1.0\n") == {}  # no block: a stray line is not a result


def test_parse_summary_takes_a_block_that_left_the_score_to_the_referee():
    metrics = common.parse_summary("---\nevaluation:       referee\ntraining_seconds: 90.1\nnum_steps: 12\n")
    assert metrics == {"evaluation": "referee", "training_seconds": 90.1, "num_steps": 12}


def test_triage_order_and_details():
    traceback = ('Traceback (most recent call last):\n  File "train.py", line 9, in <module>\n'
                 "    main()\n    ^^^^^^\nKeyError: 'lr'\n")
    assert common.triage(traceback, 1, False) == {
        "kind": "exception", "detail": "KeyError: 'lr'", "excerpt": ['File "train.py", line 9, in <module>']}
    oom = traceback.replace("KeyError: 'lr'", "RuntimeError: CUDA error: out of memory")
    assert common.triage(oom, 1, False)["kind"] == "oom"
    assert common.triage("fast_fail: loss exploded (1e9)\n", 3, False)["detail"] == "fast_fail: loss exploded (1e9)"
    assert common.triage("", 3, False)["kind"] == "fast_fail"
    assert common.triage(traceback, -15, True, 660)["kind"] == "timeout"
    signal_kill = common.triage("step 1\n", -9, False)
    assert signal_kill["kind"] == "signal" and "SIGKILL" in signal_kill["detail"]
    assert common.triage("step 1\n", 0, False)["kind"] == "no_summary"



def torchrun_log(glued=""):
    """What torchrun printed when rank 1 raised and rank 0, waiting in an all-reduce, then failed in
    gloo (seen in a suite run); `glued`: another process's last line, left without its newline."""
    return (
        "step 00001 | loss 8.3174\n"
        "[rank1]: Traceback (most recent call last):\n"
        '[rank1]:   File "crash_on_rank_1.py", line 20, in failing_dataloader\n'
        '[rank1]:     raise RuntimeError("rank 1 broke at step 2")\n'
        "[rank1]: RuntimeError: rank 1 broke at step 2\n"
        f"{glued}[rank0]: Traceback (most recent call last):\n"
        '[rank0]:   File "train.py", line 438, in combine_ranks\n'
        "[rank0]:     dist.all_reduce(both)\n"
        "[rank0]: RuntimeError: [gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:2980.\n"
        "Traceback (most recent call last):\n"
        '  File "torch/distributed/launcher/api.py", line 386, in launch_agent\n'
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "Failures:\n[1]:\n  rank      : 0 (local_rank: 0)\n  exitcode  : -15 (pid: 22153)  (SIGTERM)\n"
        "Root Cause (first observed failure):\n[0]:\n  time      : 2026-12-06_22:46:09\n"
        "  host      : localhost\n  rank      : 1 (local_rank: 1)\n  exitcode  : 1 (pid: 22154)\n")


@pytest.mark.parametrize("glued", ["", "See https://nanobind.readthedocs.io/en/latest/refleaks.html"])
def test_under_torchrun_the_rank_that_failed_first_is_the_one_triaged(glued):
    # The other ranks fail after it, in the collective it left; torchrun names the first failure.
    failure = common.triage(torchrun_log(glued), 1, False)
    assert failure["kind"] == "exception"
    assert failure["detail"] == "RuntimeError: rank 1 broke at step 2", failure
    assert failure["excerpt"] == ['File "crash_on_rank_1.py", line 20, in failing_dataloader']

def test_format_row_keeps_one_line_of_five_fields():
    row = common.LedgerRow("0123456789abcdef", 0.99, 44.04, "keep", "tabs\tand\nnewlines  squeezed")
    line = common.format_row(row)
    assert line == "0123456\t0.990000\t44.0\tkeep\ttabs and newlines squeezed\n"
    assert common.parse_row(line, 2) == common.LedgerRow("0123456", 0.99, 44.0, "keep", "tabs and newlines squeezed")


@pytest.mark.parametrize("line, words", [
    ("abc1234\t0.99\tkeep\tthree fields\n", "found 4"),
    ("not-a-hash\t0.99\t1.0\tkeep\tx\n", "is not a commit hash"),
    ("abc1234\t0.99\t1.0\tkept\tx\n", "status 'kept'"),
    ("abc1234\tlow\t1.0\tkeep\tx\n", "must be numbers"),
])
def test_a_corrupt_row_is_refused_with_its_line_number(line, words):
    with pytest.raises(common.Refusal) as error:
        common.parse_row(line, 7)
    assert "results.tsv line 7" in str(error.value) and words in str(error.value)


def test_read_ledger_refuses_a_foreign_header(tmp_path):
    ledger = tmp_path / "results.tsv"
    ledger.write_text("commit val_bpb memory_gb status description\n")
    with pytest.raises(common.Refusal, match="results.tsv line 1"):
        common.read_ledger(ledger)
    assert common.read_ledger(tmp_path / "missing.tsv") == []


def test_append_writes_the_header_once(tmp_path):
    ledger = tmp_path / "results.tsv"
    common.ensure_ledger(ledger)
    common.ensure_ledger(ledger)
    common.append_ledger_row(common.LedgerRow("abc1234", 1.0, 2.0, "keep", "baseline"), ledger)
    assert ledger.read_text() == common.LEDGER_HEADER + "abc1234\t1.000000\t2.0\tkeep\tbaseline\n"


def test_a_golf_ledger_keeps_six_columns_and_appends_in_them(tmp_path):
    ledger = tmp_path / "results.tsv"
    common.ensure_ledger(ledger, columns=common.GOLF_LEDGER_COLUMNS)
    assert ledger.read_text() == "commit\tval_bpb\tartifact_mb\tstatus\treasoning\tdescription\n"
    written = common.LedgerRow("abc1234", 1.25, 3.5, "keep", "baseline", artifact_mb=15.999999,
                               reasoning="tie the\tembeddings:\n half the bytes")
    common.append_ledger_row(written, ledger)
    assert ledger.read_text().splitlines()[1] == "abc1234\t1.250000\t15.999999\tkeep\ttie the embeddings: half the bytes\tbaseline"
    [row] = common.read_ledger(ledger)
    assert (row.artifact_mb, row.reasoning, row.description, row.memory_gb) == (15.999999, "tie the embeddings: half the bytes",
                                                                                "baseline", 0.0)
    assert common.ledger_columns(ledger) == common.GOLF_LEDGER_COLUMNS
    with open(ledger, "a") as handle:  # a five-field line in a six-column ledger
        handle.write("abc1234\t1.0\t2.0\tkeep\tx\n")
    with pytest.raises(common.Refusal, match="results.tsv line 3: expected 6 tab-separated fields"):
        common.read_ledger(ledger)


def test_the_reasoning_column_is_the_newest_hypothesis_on_one_line(tmp_path):
    notes = tmp_path / "notes.md"
    assert common.newest_hypothesis(notes) == ""
    notes.write_text("## Experiment Log\n\n<!-- ### REASONING: example\n- hypothesis: from the template -->\n"
                     "### REASONING: old\n- hypothesis: an older one\n\n### ANALYSIS: old\n- result: worse\n\n"
                     "### REASONING: tied embeddings\n- evidence: the embedding is 40% of the bytes\n"
                     "- hypothesis:  tying them halves   the artifact\n  and costs 0.01 bpb\n- risk: none\n\n## Ideas Queue\n- x\n")
    assert common.newest_hypothesis(notes) == "tying them halves the artifact"
    notes.write_text("### REASONING: lr sweep\nraise the lr\n")
    assert common.newest_hypothesis(notes) == "raise the lr"  # no hypothesis item: its first line
    notes.write_text("### REASONING: only a name\n")
    assert common.newest_hypothesis(notes) == "only a name"


def row(commit, val_bpb, status):
    return common.LedgerRow(commit, val_bpb, 1.0, status, commit)


def test_backtrack_cuts_the_kept_lineage_back_to_its_target():
    rows = [row("aaaaaaa", 1.0, "keep"), row("bbbbbbb", 0.9, "keep"), row("ccccccc", 0.8, "keep"),
            row("ddddddd", 0.7, "discard"), row("bbbbbbb", 0.9, "backtrack")]
    assert [kept.commit for kept in common.kept_lineage(rows)] == ["aaaaaaa", "bbbbbbb"]
    assert common.best_kept(rows).val_bpb == 0.9 and common.best_ever(rows).val_bpb == 0.8
    assert len(common.experiments(rows)) == 4


def test_verdict_and_keep_rule():
    noise = common.DEFAULT_NOISE_BPB
    assert common.verdict(1.0, None, noise, 10, 10) == "baseline"
    assert common.verdict(0.99, 1.0, noise, 10, 10) == "improved"
    assert common.verdict(1.0005, 1.0, noise, 9, 10) == "simpler"
    assert common.verdict(1.0005, 1.0, noise, 10, 10) == "not improved"
    assert common.verdict(1.01, 1.0, noise, 5, 10) == "not improved"  # shorter, but beyond the noise
    assert common.keep_allowed(1.0005, 1.0, noise, 9, 10) and not common.keep_allowed(1.0005, 1.0, noise, 10, 10)
    assert common.noise_band({"noise_bpb": 0.004}) == 0.004 and common.noise_band({}) == noise
    assert common.noise_band({"noise_bpb": 0.0}) == common.MIN_NOISE_BPB  # a spread measured as nothing


def test_a_win_under_the_margin_is_marginal_until_the_mean_of_two_runs_clears_it():
    noise = 0.001  # one run must win by 3 noise units; the mean of two by 3 / sqrt(2) = 2.12
    assert common.verdict(0.997, 1.0, noise, 10, 10) == "improved"
    assert common.verdict(0.9975, 1.0, noise, 10, 10) == "marginal"
    assert not common.keep_allowed(0.9975, 1.0, noise, 10, 10)
    assert common.verdict(0.9978, 1.0, noise, 10, 10, runs=2) == "confirmed"
    assert common.verdict(0.9980, 1.0, noise, 10, 10, runs=2) == "not confirmed"
    assert common.verdict(1.001, 1.0, noise, 10, 10, runs=2) == "not improved"
    assert common.verdict(0.9, 1.0, noise, 10, 10, change="cosmetic") == "cosmetic"
    assert common.verdict(0.9, 1.0, noise, 10, 10, change="none") == "rerun"
    assert common.verdict(0.9, None, noise, 10, 10, change="none") == "baseline"


@pytest.mark.parametrize("lines, kind", [
    ([], "none"),
    (["-torch.manual_seed(42)", "+torch.manual_seed(43)"], "cosmetic"),
    (["+SEED_OFFSET = 1  # try another", '+os.environ["AUTORESEARCH_SEED"] = "7"'], "cosmetic"),
    (["+    print(f'step {step}')", "+logger.info('x')", "+", "+# why"], "cosmetic"),
    (["-LR = 0.04", "+LR = 0.05"], "code"),
    (["+print('lr'); LR = 0.05"], "code"),  # a print that is not only a print
    (["+LR = 0.05 if seed else 0.04"], "code"),
    (["+print(LR := 0.05)"], "code"),
    (["+    print(f'loss {x}',", "+          f'more {y}')"], "code"),  # a continuation line is not recognised: counted as code
])
def test_classify_change(lines, kind):
    diff = "--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n" + "\n".join(lines) if lines else ""
    assert common.classify_change(diff) == kind


def test_pooled_noise_is_the_spread_within_each_commit():
    assert common.pooled_noise([("a", 1.0)]) is None
    assert common.pooled_noise([("a", 1.001), ("a", 0.999)]) == pytest.approx(0.001414, abs=1e-6)
    # Two commits at different levels: only the spread within each counts.
    assert common.pooled_noise([("a", 1.0), ("a", 1.002), ("b", 0.5), ("b", 0.502)]) == pytest.approx(0.001414, abs=1e-6)


def test_referee_verdict_tolerance():
    scored = {"status": "scored", "bpb": 1.0, "detail": None, "seconds": 1.0, "log": "x"}
    assert runner.referee_verdict(1.0 + runner.REFEREE_TOLERANCE_BPB / 2, scored)["status"] == "verified"
    caught = runner.referee_verdict(0.5, scored)
    assert caught["status"] == "invalid" and "printed val_bpb 0.500000" in caught["detail"]
    assert runner.referee_verdict(1.0, dict(scored, status="failed", detail="no model.pt2"))["status"] == "unverified"
    assert runner.referee_verdict(1.0, dict(scored, status="invalid", detail="invalid: not causal"))["status"] == "invalid"


def test_referee_verdict_without_a_number_of_train_pys_own():
    scored = {"status": "scored", "bpb": 1.0, "detail": None, "seconds": 1.0, "log": "x"}
    assert runner.referee_verdict(None, scored)["status"] == "verified"


def test_the_allowance_follows_the_measured_overhead_within_its_bounds():
    assert runner.allowance_from([0.05, 0.1], 2) == pytest.approx(0.5)  # the floor
    assert runner.allowance_from([8.0], 90) == pytest.approx(1.5 * 8 + 9)
    assert runner.allowance_from([500.0], 90) == runner.ALLOWANCE_MAX_SECONDS == 300  # the cap: five minutes
    assert runner.allowance_from([500.0], 600) == 600  # or the budget again, if more
    assert runner.compute_limit({"time_budget": 90}) == 90 + 300  # not measured yet: the cap
    assert runner.compute_limit({"time_budget": 90, "allowance_s": 21.0}) == 111
    assert runner.compute_limit({}) is None
    # two ranks under torchrun on the CPU clock: three processes import torch, the budget is shared
    assert runner.compute_limit({"time_budget": 90, "allowance_s": 21.0}, processes=3) == 90 + 63


def test_on_a_token_budget_the_ceiling_follows_the_baseline_s_measured_compute():
    session = {"time_budget": 90, "train_tokens": 2**19, "baseline_compute_s": []}
    assert runner.compute_limit(session) == 90 + 300  # not measured yet: the time budget's cap
    for compute in (100.0, 120.0):
        runner.record_baseline(session, {"compute_seconds": compute, "clock": "cpu_time", "processes": 1})
    assert session["baseline_compute_s"] == [100.0, 120.0] and "allowance_s" not in session
    assert runner.compute_limit(session) == runner.TOKEN_CEILING * 120 == 180
    assert runner.compute_limit(session, processes=3) == 3 * 180  # each process pays its own start-up
    runner.record_baseline(session, {"compute_seconds": 30.0, "clock": "none"})  # a cluster job's wall time
    assert session["baseline_compute_s"] == [100.0, 120.0]
    assert "1.5 x the 120.0 s the baseline used at setup" in runner.limit_text(session, 180)


def test_the_process_tree_counts_every_descendant(tmp_path):
    import subprocess
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        for _ in range(200):
            tree = runner.descendants(parent.pid, runner.process_table())
            if len(tree) == 2:
                break
            __import__("time").sleep(0.05)
        assert len(tree) == 2 and tree[0] == parent.pid
        assert runner.tree_cpu_seconds(parent.pid) >= 0
    finally:
        runner.stop_process_group(parent.pid, grace=0)
        parent.wait()


def test_protections_off_and_verified():
    full = {"sandbox": "on", "referee": "on", "eval_hidden": True, "pid_namespace": True,
            "compute_measured": "cpu_time", "train_command": "default", "shared": []}
    assert common.protections_off(full) == [] and runner.is_verified(full, "verified")
    assert not runner.is_verified(full, "unverified")
    for change, words in ((dict(referee="off", eval_hidden=False), ["self-reported (referee off)"]),
                          (dict(sandbox="unavailable: no bwrap", eval_hidden=False, pid_namespace=False),
                           ["sandbox unavailable"]),
                          (dict(sandbox="off", eval_hidden=False, pid_namespace=False), ["sandbox off"]),
                          (dict(eval_hidden=False), ["eval data visible"]),
                          (dict(shared=["/tmp/x"]), ["sandbox shares paths"]),
                          (dict(compute_measured="none"), ["compute not measured (cluster job)"])):
        assert common.protections_off(dict(full, **change)) == words
        assert not runner.is_verified(dict(full, **change), "verified")
    assert common.protections_off(dict(full, train_command="custom")) == []  # recorded, not printed
    assert not runner.is_verified(dict(full, train_command="custom"), "verified")


def test_a_run_sent_to_a_cluster_is_not_held_to_the_dispatcher_s_own_compute():
    """Only dispatch.py runs here: its CPU time (polling the cluster) is no measure of the job's, and
    capping it at the budget killed good runs on a slow box. The job's limit is the timeout."""
    session = {"profile": "cpu", "time_budget": 5, "allowance_s": 0.8}
    python = sys.executable
    sent = [python, "scripts/dispatch.py", "--backend", "ray", "--gpus", "1", "--", python, "train.py"]
    assert runner.dispatched(sent) and runner.protections(session, sent)["compute_measured"] == "none"
    local = [python, "train.py"]
    assert not runner.dispatched(local) and runner.protections(session, local)["compute_measured"] == "cpu_time"
    assert not runner.dispatched([python, "wrap.py", "--", python, "dispatch.py"])  # the job's own script
    overheads = list(session.get("overheads_s", []))
    runner.record_baseline(session, {"compute_seconds": 30.0, "clock": "none"})  # a job's wall time sets nothing
    assert session.get("overheads_s", []) == overheads and session["allowance_s"] == 0.8


def test_a_trusted_log_replaces_a_planted_link_and_never_writes_through_it(tmp_path):
    victim, log = tmp_path / "victim", tmp_path / "referee-val.log"
    victim.write_text("precious\n")
    log.symlink_to(victim)
    with runner.open_trusted(log) as f:
        f.write(b"val_bpb: 1.0\n")
    assert victim.read_text() == "precious\n" and not log.is_symlink() and log.read_text() == "val_bpb: 1.0\n"
    log.unlink()
    log.symlink_to(victim)
    with pytest.raises(OSError):
        runner.append_trusted(log, "more\n")
    with pytest.raises(common.Refusal, match="symbolic link"):
        common.read_json(log)
    assert victim.read_text() == "precious\n"


def test_stop_reason_reads_the_session_limits():
    assert common.stop_reason({"deadline": "2000-01-01T00:00:00+00:00"}, []).startswith("the session deadline")
    rows = [row("aaaaaaa", 1.0, "keep"), row("bbbbbbb", 1.1, "discard"), row("aaaaaaa", 1.0, "backtrack")]
    assert "2 experiments done" in common.stop_reason({"max_experiments": 2}, rows)
    assert common.stop_reason({"max_experiments": 3, "deadline": "2999-01-01T00:00:00Z"}, rows) is None


def test_the_example_ledger_is_a_valid_ledger():
    rows = common.read_ledger(Path(__file__).resolve().parent.parent / "results.tsv.example")
    assert {row.status for row in rows} == set(common.STATUSES)
