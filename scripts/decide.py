"""Close the pending experiment (keep or discard), or rewind to an earlier kept commit (backtrack).

keep      appends a `keep` row and leaves the branch where it is. Refused (exit 2, one line) unless
          the experiment beat the best by the noise margin (common.KEEP_MARGIN_NOISE noise units
          on one run, or on the mean of its runs after `experiment.py --confirm`), or is a
          simplification within the noise (train.py got shorter), and the referee verified its
          number. A marginal win is refused with the command that confirms it, and so is a keep
          after any pinned file or any byte of the prepared data changed. --force overrides
          these (the row says so), but never for a diff that only touches seeds, printing, logging
          or comments, or changes nothing: those are never a keep. The row carries the judged
          val_bpb: the mean of the runs, on the referee's numbers. A keep that makes a new best
          scores the held-out test split too (runs/heldout.json; nothing is printed).
discard   appends a `discard` row and resets the branch to the last kept commit.
          A crashed run is recorded as `crash`, and a result the referee caught as `invalid`,
          whatever was asked, and reset the same way. The saved models (model.pt2) of runs that
          were not kept are deleted: about 200 MB each on the H100 profile.
          An external task's run that broke a constraint of autoresearch.toml is recorded as
          `constraint`, with its number, whatever was asked: never a keep, --force included. Its
          keep rule compares in the task's direction (higher is better, where it says so).
backtrack rewinds the branch to an earlier kept commit (default: the best) and appends a
          `backtrack` row; later experiments compare against the best kept up to that commit.

Resets happen only when no tracked file has uncommitted changes; untracked and ignored files
(results.tsv, runs/, notes.md, memory) are never touched. The ledger row is written here and only
here, once: a decision interrupted half-way is finished by running the same command again.

Usage:
    uv run scripts/decide.py keep [--force]
    uv run scripts/decide.py discard
    uv run scripts/decide.py backtrack [COMMIT] [--reason TEXT]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import dispatch  # noqa: E402  (stdlib only; a cluster's client is imported when a job is cancelled)
import runner  # noqa: E402
import tracking  # noqa: E402


def check_branch(session):
    branch = common.current_branch()
    if branch != session["branch"]:
        raise common.Refusal(f"on {branch or 'a detached HEAD'}, but the session is {session['branch']}: "
                             f"git checkout {session['branch']}")


def check_clean_for_reset(what):
    changed = common.changed_tracked_files()
    if changed:
        raise common.Refusal(f"{what} resets the branch, but tracked files have uncommitted changes "
                             f"({', '.join(changed)}): commit or revert them first")


def load_summary(pending):
    path = common.ROOT / pending["run_dir"] / "summary.json" if pending.get("run_dir") else None
    return (common.read_json(path) if path else None), path


def close_interrupted(pending):
    """An experiment whose experiment.py died mid-run: stop training it left behind, and write
    a crash summary. Returns the experiment's commit, or None when it never got committed."""
    pgid = pending.get("training_pgid")
    same_machine = pending.get("host") == os.uname().nodename and pending.get("boot_id") == common.boot_id()
    if pgid and same_machine and runner.process_group_alive(pgid):
        runner.stop_process_group(pgid)
    if dispatch.jobs_dir(common.ROOT).is_dir():
        # A cluster run (lanes with SLURM or Ray) goes on without the killed dispatch.py that watched
        # it; nothing else in this worktree runs now, so every job still in flight is that run's.
        dispatch.cancel_in_flight(common.ROOT, reason="its experiment was interrupted")
    commit = pending.get("commit")
    if commit is None:
        head = common.head_commit()
        if head == pending["parent"]:
            return None
        commit = head  # killed between `git commit` and recording it
    summary, path = load_summary(pending)
    if path and summary is None:
        common.write_json_atomic(path, {
            "id": pending["id"], "description": pending["description"], "status": "crash",
            "verdict": "crash", "val_bpb": None, "commit": commit, "parent": pending["parent"],
            "triage": {"kind": "interrupted", "detail": "experiment.py was killed before it finished",
                       "excerpt": []},
            "started_at": pending.get("started_at")})
    return commit


def keep_refusal(summary, pending, rows, session):
    """Why `keep` is refused, as (message, whether --force may override it), or None when it is allowed.
    The rule is recomputed here from summary.json (which only the helpers write), not taken from
    the verdict experiment.py printed."""
    number, best = pending["id"], common.best_kept(rows)
    summary = summary or {"val_bpb": pending["val_bpb"], "runs": 1, "change": "code", "referee": None,
                          "train_py_lines": 0, "parent_train_py_lines": 0}
    if runner.golf_session(session):  # a hard rule of the challenge, checked before the numbers
        size = summary.get("artifact_bytes") if summary.get("samples") else None
        if not isinstance(size, int):
            return (f"keep refused: experiment {number} has no artifact size measured, and parameter golf keeps "
                    f"only an artifact under {runner.GOLF_LIMIT_BYTES:,} bytes: {common.DISCARD_COMMAND}", False)
        if size > runner.GOLF_LIMIT_BYTES:
            return (f"keep refused: experiment {number}'s artifact is {size:,} bytes (train.py plus the int8+zlib "
                    f"model), over parameter golf's {runner.GOLF_LIMIT_BYTES:,}: {common.DISCARD_COMMAND}", False)
    noise, metric = common.noise_band(session), common.metric_name(session)
    judged = common.verdict(summary["val_bpb"], best.val_bpb if best else None, noise,
                            summary.get("train_py_lines", 0), summary.get("parent_train_py_lines", 0),
                            runs=summary.get("runs") or 1, change=summary.get("change", "code"),
                            direction=common.metric_direction(session))
    if judged in common.NEVER_KEEP_VERDICTS:
        what = "changes nothing in train.py" if judged == "rerun" else "only touches seeds, printing, logging or comments"
        return (f"keep refused: experiment {number} {what}, so a lower val_bpb is luck and never a keep: "
                f"{common.DISCARD_COMMAND}", False)
    delta = summary["val_bpb"] - best.val_bpb if best else 0.0
    units = common.noise_units(delta, noise)
    if judged == "marginal":
        return (f"keep refused: experiment {number} beat the best by {-units:.1f} noise units ({noise:.6f} each) on "
                f"one run, under the {common.KEEP_MARGIN_NOISE:g} needed: confirm it under a new seed with "
                f"{common.CONFIRM_COMMAND}, or discard it", True)
    if judged == "not confirmed":
        return (f"keep refused: experiment {number}'s mean of {summary['runs']} runs beat the best by {-units:.1f} "
                f"noise units, under the {common.keep_margin(summary['runs']):.2f} needed: {common.DISCARD_COMMAND}", True)
    if judged not in common.KEEP_VERDICTS:
        return (f"keep refused: {metric} {summary['val_bpb']:.6f} is worse than the best kept "
                f"{best.val_bpb:.6f} ({best.commit}) by {delta:.6f}, and not a simplification within the noise "
                f"band {noise:g}: discard it, or --force", True)
    if session.get("referee") != "off" and summary.get("referee") != "verified":
        samples = [s for s in summary.get("samples") or [] if (s.get("referee") or {}).get("detail")]
        detail = samples[0]["referee"]["detail"] if samples else "no referee result recorded"
        return (f"keep refused: experiment {number} is unverified ({detail}): the referee could not re-score "
                "the model train.py saved; make the model exportable (torch.export), or discard it", True)
    return None


def decide_pending(action, force):
    session = common.require_session()
    check_branch(session)
    pending = common.load_pending()
    if pending is None:
        raise common.Refusal("nothing is pending a decision: run uv run scripts/experiment.py first")
    state = common.pending_state(pending)
    if state == "running":
        raise common.Refusal(common.pending_message(pending))
    rows = common.read_ledger()
    number = pending["id"]
    decision = pending.get("decision")  # present when an earlier decide.py was interrupted
    commit = pending.get("commit")
    summary, summary_path = load_summary(pending)
    stop_orphaned_confirmation(pending)

    if decision:
        status, forced = decision["status"], decision["forced"]
    elif state == "interrupted":
        commit = close_interrupted(pending)
        if commit is None:
            common.PENDING_FILE.unlink()
            print(f"{number} was interrupted before its commit: nothing ran, nothing recorded")
            return 0
        status, forced = "crash", False
    elif pending.get("status") in common.NO_RESULT_STATUSES + (common.CONSTRAINT_STATUS,):
        status, forced = pending["status"], False
    elif action == "keep":
        # a helper, a hook, prepare.py or any byte of the prepared data changed since the experiment: stop here
        runner.check_pins(session, data="full")
        refusal = keep_refusal(summary, pending, rows, session)
        if refusal and not (force and refusal[1]):
            raise common.Refusal(refusal[0] + ("" if refusal[1] else " (--force cannot override this)"))
        status, forced = "keep", refusal is not None
    else:
        status, forced = "discard", False

    if status == "keep" and common.head_commit() != commit:
        raise common.Refusal(f"HEAD is {common.head_commit()[:7]}, not experiment {number}'s commit "
                             f"{commit[:7]}: git checkout it, or discard")
    target = None
    if status != "keep":
        check_clean_for_reset("recording a " + status)
        target = common.base_commit(rows, session)
    if not decision:
        decision = {"status": status, "forced": forced, "asked": action, "decided_at": common.now_iso(),
                    "ledger_rows_before": len(rows),
                    "new_best": status == "keep" and (common.best_ever(rows) is None
                                                      or common.beats(pending["val_bpb"], common.best_ever(rows).val_bpb))}
        pending.update(decision=decision, commit=commit)
        common.write_json_atomic(common.PENDING_FILE, pending)  # first: a retry then never doubles the row

    if len(rows) <= decision["ledger_rows_before"]:
        ok = status not in common.NO_RESULT_STATUSES
        runs = (summary or {}).get("runs") or 1
        description = pending["description"] + (f" [mean of {runs} runs]" if ok and runs > 1 else "")
        description += " [forced keep]" if forced else ""
        size = pending.get("artifact_bytes")
        common.append_ledger_row(common.LedgerRow(
            commit[:7], pending["val_bpb"] if ok else 0.0, pending.get("memory_gb", 0.0) if ok else 0.0,
            status, description, artifact_mb=size / 1e6 if ok and isinstance(size, int) else 0.0,
            reasoning=pending.get("reasoning", ""), extras=pending.get("columns")))
    if summary is not None:
        summary["decision"] = decision
        common.write_json_atomic(summary_path, summary)
        tracking.submit(summary_path.parent)  # the tracker run's status tag follows the decision
    if status == "keep" and decision.get("new_best") and session.get("task") != "external":  # no referee to score it
        score_held_out(pending, summary, session)
    if status != "keep":
        runner.delete_saved_models(run_dirs_of(pending, summary))
    if target:
        common.reset_hard(target)
    common.PENDING_FILE.unlink(missing_ok=True)

    best = common.best_kept(common.read_ledger())
    best_text = f"best {best.val_bpb:.6f} ({best.commit})" if best else "nothing kept yet"
    if status == "keep":
        print(f"{number} kept {commit[:7]}{' (forced)' if forced else ''}; {best_text}")
    elif status == common.CONSTRAINT_STATUS:
        asked = "" if action == "discard" else f" (not {action}: it broke a constraint of the task)"
        print(f"{number} recorded as {status}{asked}; branch reset to {target[:7]}; {best_text}")
    elif status in common.NO_RESULT_STATUSES:
        asked = "" if action == "discard" else f" (not {action}: it {'crashed' if status == 'crash' else 'is invalid'})"
        print(f"{number} recorded as {status}{asked}; branch reset to {target[:7]}; {best_text}")
    else:
        print(f"{number} discarded; branch reset to {target[:7]}; {best_text}")
    return 0


def run_dirs_of(pending, summary):
    """The run folders of an experiment: its own and its confirmations'."""
    folders = [pending["run_dir"]] if pending.get("run_dir") else []
    folders += [f"runs/{name}" for name in (summary or {}).get("confirmations") or []]
    if (pending.get("confirmation") or {}).get("run_dir"):
        folders.append(pending["confirmation"]["run_dir"])
    return sorted(set(folders))


def stop_orphaned_confirmation(pending):
    """A confirmation whose experiment.py was killed may have left training running: stop it."""
    confirmation = pending.get("confirmation") or {}
    pgid = confirmation.get("training_pgid")
    same_machine = confirmation.get("host") == os.uname().nodename and confirmation.get("boot_id") == common.boot_id()
    if pgid and same_machine and confirmation.get("state") == "running" and runner.process_group_alive(pgid):
        runner.stop_process_group(pgid)


def score_held_out(pending, summary, session):
    """A new best: score its model on the held-out test split with the trusted evaluator and append
    the pair to runs/heldout.json. Never printed: the agent decides on val only, and a widening gap
    between val and test (status.py --report) is the sign that hundreds of decisions overfit val."""
    records = common.read_json(common.HELDOUT_FILE) or []
    if any(record["id"] == pending["id"] for record in records):
        return  # an interrupted decide.py already scored it
    samples = (summary or {}).get("samples") or [{"run": os.path.basename(pending["run_dir"]), "referee": None}]
    first = samples[0]
    manifest = common.load_manifest() or {}
    timeout = runner.default_timeout(manifest) if common.is_finite_number(manifest.get("time_budget")) else 3600
    scored = runner.score_saved_model(common.RUNS_DIR / first["run"], "test", session, timeout)
    referee = first.get("referee") or {}
    val_of_model = referee.get("bpb") if referee.get("status") == "verified" else first.get("val_bpb")
    records.append({
        "id": pending["id"], "commit": pending["commit"][:7], "description": pending["description"],
        "val_bpb": pending["val_bpb"], "model_run": first["run"], "model_val_bpb": val_of_model,
        "test_bpb": scored["bpb"], "gap": scored["bpb"] - val_of_model if scored["bpb"] is not None and val_of_model
        is not None else None, "error": scored["detail"], "test_seconds": scored["seconds"],
        "scored_at": common.now_iso()})
    common.write_json_atomic(common.HELDOUT_FILE, records)


def backtrack(commit_arg, reason):
    session = common.require_session()
    check_branch(session)
    pending = common.load_pending()
    if pending:
        raise common.Refusal(common.pending_message(pending))
    rows = common.read_ledger()
    kept = [row for row in rows if row.status == "keep"]
    if not kept:
        raise common.Refusal("nothing has been kept yet: there is no earlier kept commit to go back to")
    if commit_arg:
        wanted = commit_arg.lower()
        matches = [row for row in kept if row.commit.startswith(wanted[:7]) and len(wanted) >= 4]
        if not matches:
            recent = ", ".join(row.commit for row in kept[-5:])
            raise common.Refusal(f"{commit_arg} is not a kept commit in results.tsv (latest kept: {recent})")
        target = matches[-1]
    else:
        target = common.best_ever(rows)
    full = common.resolve_commit(target.commit)
    if full == common.head_commit():
        raise common.Refusal(f"the branch is already at {target.commit}: nothing to backtrack")
    check_clean_for_reset("backtrack")
    common.reset_hard(full)
    description = f"backtrack to {target.commit} ({reason or target.description})"
    common.append_ledger_row(common.LedgerRow(target.commit, target.val_bpb, target.memory_gb,
                                              "backtrack", description, target.artifact_mb, reason or "", target.extras))
    tracking.submit_backtrack(target.commit, rows)
    print(f"branch reset to {target.commit} (val_bpb {target.val_bpb:.6f}: {target.description})")
    return 0


def main():
    parser = argparse.ArgumentParser(description="Keep or discard the pending experiment, "
                                     "or backtrack to an earlier kept commit.")
    parser.add_argument("action", choices=("keep", "discard", "backtrack"),
                        help="keep: record and stay; discard: record and reset to the last kept commit; "
                        "backtrack: rewind to an earlier kept commit")
    parser.add_argument("commit", nargs="?", help="backtrack only: the kept commit to go back to "
                        "(default: the best kept)")
    parser.add_argument("--force", action="store_true",
                        help="keep even when val_bpb is worse than the best kept (recorded in the ledger)")
    parser.add_argument("--reason", help="backtrack only: why, recorded in the ledger's description")
    args = parser.parse_args()
    if args.action == "backtrack":
        if args.force:
            raise common.Refusal("--force applies to keep only")
        return backtrack(args.commit, args.reason)
    if args.commit or args.reason:
        raise common.Refusal(f"{args.action} takes no commit or --reason: it decides the pending experiment")
    if args.force and args.action != "keep":
        raise common.Refusal("--force applies to keep only")
    return decide_pending(args.action, args.force)


if __name__ == "__main__":
    common.run_main(main)
