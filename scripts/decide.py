"""Close the pending experiment (keep or discard), or rewind to an earlier kept commit (backtrack).

keep      appends a `keep` row and leaves the branch where it is. Refused (exit 2) when val_bpb is
          worse than the best kept, unless it is a simplification win: within the noise band and
          train.py got shorter. --force overrides, and the row says so.
discard   appends a `discard` row and resets the branch to the last kept commit.
          A crashed run is recorded as `crash` whatever was asked, and reset the same way.
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
    if pgid and same_machine and common.process_group_alive(pgid):
        common.stop_process_group(pgid)
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

    if decision:
        status, forced = decision["status"], decision["forced"]
    elif state == "interrupted":
        commit = close_interrupted(pending)
        if commit is None:
            common.PENDING_FILE.unlink()
            print(f"{number} was interrupted before its commit: nothing ran, nothing recorded")
            return 0
        status, forced = "crash", False
    elif pending.get("status") == "crash":
        status, forced = "crash", False
    elif action == "keep":
        best, summary_lines = common.best_kept(rows), summary or {}
        allowed = best is None or common.keep_allowed(
            pending["val_bpb"], best.val_bpb, common.noise_band(session),
            summary_lines.get("train_py_lines", 0), summary_lines.get("parent_train_py_lines", 0))
        if not allowed and not force:
            raise common.Refusal(
                f"keep refused: val_bpb {pending['val_bpb']:.6f} is worse than the best kept "
                f"{best.val_bpb:.6f} ({best.commit}) by {pending['val_bpb'] - best.val_bpb:.6f}, and not a "
                f"simplification within the noise band {common.noise_band(session):g}: discard it, or --force")
        status, forced = "keep", not allowed
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
                    "ledger_rows_before": len(rows)}
        pending.update(decision=decision, commit=commit)
        common.write_json_atomic(common.PENDING_FILE, pending)  # first: a retry then never doubles the row

    if len(rows) <= decision["ledger_rows_before"]:
        ok = status != "crash"
        description = pending["description"] + (" [forced keep]" if forced else "")
        common.append_ledger_row(common.LedgerRow(
            commit[:7], pending["val_bpb"] if ok else 0.0, pending.get("memory_gb", 0.0) if ok else 0.0,
            status, description))
    if summary is not None:
        summary["decision"] = decision
        common.write_json_atomic(summary_path, summary)
    if target:
        common.reset_hard(target)
    common.PENDING_FILE.unlink(missing_ok=True)

    best = common.best_kept(common.read_ledger())
    best_text = f"best {best.val_bpb:.6f} ({best.commit})" if best else "nothing kept yet"
    if status == "keep":
        print(f"{number} kept {commit[:7]}{' (forced)' if forced else ''}; {best_text}")
    elif status == "crash":
        asked = "" if action == "discard" else f" (not {action}: it crashed)"
        print(f"{number} recorded as crash{asked}; branch reset to {target[:7]}; {best_text}")
    else:
        print(f"{number} discarded; branch reset to {target[:7]}; {best_text}")
    return 0


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
                                              "backtrack", description))
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
