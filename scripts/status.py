"""Where the research session stands, in a few lines (or JSON for hooks and the loop).

Branch and session, experiments per hour, the best val_bpb with its commit and description,
minutes since the last improvement, counts by status (invalid: caught by the referee), the
measured noise, the sandbox and referee, the pending experiment, the session's stop condition,
and the last five ledger rows. For an external task (autoresearch.toml) it names the task and its metric, and
says the results are self-reported (the task's script scores itself; there is no referee).

--report is the human's view of the held-out check: for each new best, val_bpb and the test
split's score of the same model (runs/heldout.json), and how the gap between them moved over the
session. A widening gap means the keep/discard decisions are overfitting the validation shard.
The agent decides on val alone and is not shown these numbers.

Usage:
    uv run scripts/status.py [--json]
    uv run scripts/status.py --report
"""

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

RECENT_ROWS = 5


def decided_at(commit, status="keep"):
    """When the run of `commit` was decided as `status` (from its summary.json), or None."""
    for path in sorted(common.RUNS_DIR.glob(f"[0-9][0-9][0-9][0-9]-{commit}/summary.json"), reverse=True):
        decision = (common.read_json(path) or {}).get("decision") or {}
        if decision.get("status") == status:
            return common.parse_iso(decision["decided_at"])
    return None


def last_finished_at():
    runs = sorted(common.RUNS_DIR.glob("[0-9][0-9][0-9][0-9]-*/summary.json"))
    finished = (common.read_json(runs[-1]) or {}).get("finished_at") if runs else None
    return common.parse_iso(finished) if finished else None


def rerun_spread(rows):
    """The largest val_bpb range among commits run more than once: a measured noise floor."""
    by_commit = {}
    for row in rows:
        if row.status in ("keep", "discard") and "[mean of" not in row.description:
            by_commit.setdefault(row.commit, []).append(row.val_bpb)
    spreads = [max(values) - min(values) for values in by_commit.values() if len(values) > 1]
    return max(spreads) if spreads else None


def latest_experiment():
    """summary.json of the newest experiment run (not a noise run or confirmation), or None."""
    for path in sorted(common.RUNS_DIR.glob("[0-9][0-9][0-9][0-9]-*/summary.json"), reverse=True):
        summary = common.read_json(path) or {}
        if summary.get("kind", "experiment") == "experiment" and summary.get("protections"):
            return summary
    return None


def forced_keeps():
    return sum(((common.read_json(path) or {}).get("decision") or {}).get("forced") is True
               for path in common.RUNS_DIR.glob("[0-9][0-9][0-9][0-9]-*/summary.json"))


def pending_summary(pending):
    return {"id": pending["id"], "state": common.pending_state(pending), "verdict": pending.get("verdict"),
            "val_bpb": pending.get("val_bpb"), "description": pending.get("description"),
            "message": common.pending_message(pending)}


def row_dict(row):
    return row._asdict()


def gather():
    session = common.load_session()
    rows = common.read_ledger()
    if session is None and not rows:
        raise common.Refusal("no research session here: run uv run scripts/setup.py first")
    session = session or {}
    now = datetime.datetime.now(datetime.timezone.utc)
    runs = common.experiments(rows)
    counts = common.status_counts(rows)
    best, baseline = common.best_ever(rows), common.baseline_row(rows)
    improved_at = decided_at(best.commit) if best else None
    started = common.parse_iso(session["started_at"]) if session.get("started_at") else None
    until = last_finished_at() or now
    hours = (until - started).total_seconds() / 3600 if started else None
    pending = common.load_pending()
    latest = latest_experiment()
    guards = (latest or {}).get("protections")
    return {
        "branch": common.current_branch(),
        "session": session.get("tag"),
        "task": session.get("task_name") if session.get("task") == "external" else None,
        "metric": common.metric_name(session),
        "direction": common.metric_direction(session),
        "self_reported": session.get("task") == "external" or session.get("referee") == "off",
        "profile": session.get("profile"),
        "dataset": session.get("dataset"),
        "started_at": session.get("started_at"),
        "experiments": len(runs),
        "per_hour": round(len(runs) / hours, 2) if hours and hours > 0 else None,
        "counts": counts,
        "best": row_dict(best) if best else None,
        "baseline": row_dict(baseline) if baseline else None,
        "frontier": row_dict(common.kept_lineage(rows)[-1]) if common.kept_lineage(rows) else None,
        "minutes_since_improvement": round((now - improved_at).total_seconds() / 60, 1) if improved_at else None,
        "noise_bpb": common.noise_band(session),
        "noise_source": "session" if session.get("noise_bpb") is not None else "default",
        "noise": common.noise_summary(session),
        "noise_runs": len(session.get("noise_runs") or []),
        "sandbox": session.get("sandbox"),
        "referee": session.get("referee"),
        "protections": guards,  # of the newest experiment
        "protections_off": common.protections_off(guards) if guards else [],
        "verified": (latest or {}).get("verified"),
        "lowered": session.get("lowered") or [],  # protection-lowering flags given to setup
        "forced_keeps": forced_keeps(),
        "rerun_spread_bpb": rerun_spread(rows),
        "pending": pending_summary(pending) if pending else None,
        "deadline": session.get("deadline"),
        "max_experiments": session.get("max_experiments"),
        "stop_reason": common.stop_reason(session, rows) if session else None,
        "last_rows": [row_dict(row) for row in rows[-RECENT_ROWS:]],
    }


def print_text(status):
    rate = f", {status['per_hour']}/h" if status["per_hour"] is not None else ""
    print(f"{status['branch']} (session {status['session']}, profile {status['profile']}): "
          f"{status['experiments']} experiments{rate}")
    best, baseline = status["best"], status["baseline"]
    if best:
        since = status["minutes_since_improvement"]
        since = f"; last improvement {since:.0f} min ago" if since is not None else ""
        print(f"best {status['metric']} {best['val_bpb']:.6f} ({best['commit']}: {best['description']}), "
              f"baseline {baseline['val_bpb']:.6f} ({best['val_bpb'] - baseline['val_bpb']:+.6f}){since}")
    counts = ", ".join(f"{name} {count}" for name, count in status["counts"].items())
    spread = status["rerun_spread_bpb"]
    spread = f", re-run spread {spread:.6f}" if spread is not None else ""
    print(f"{counts}; noise {status['noise']}{spread}")
    guards = [f"task {status['task']} (autoresearch.toml: {status['metric']}, {status['direction']} is better, "
              "self-reported)"] if status["task"] else []
    guards += [f"referee {status['referee']}"] if status["referee"] else []
    guards += [f"sandbox {status['sandbox']}"] if status["sandbox"] else []
    if status["protections_off"]:
        guards.append(f"last experiment: {', '.join(status['protections_off'])}")
    elif status["verified"] is not None:
        guards.append("last experiment verified" if status["verified"] else "last experiment not verified")
    guards += [f"set up with {' '.join(status['lowered'])}"] if status["lowered"] else []
    guards += [f"forced keeps {status['forced_keeps']}"] if status["forced_keeps"] else []
    if guards:
        print(", ".join(guards))
    if status["pending"]:
        print(f"pending: {status['pending']['message']}")
    if status["stop_reason"]:
        print(f"stop: {status['stop_reason']}")
    elif status["deadline"] or status["max_experiments"]:
        limits = [f"deadline {status['deadline']}"] if status["deadline"] else []
        limits += [f"max_experiments {status['max_experiments']}"] if status["max_experiments"] else []
        print(f"limits: {', '.join(limits)}")
    columns = common.ledger_columns()
    for row in status["last_rows"]:
        print(common.format_row(common.LedgerRow(**row), columns), end="")


def protections_report(status):
    """For the human: which protections this session ran without."""
    off = list(status["protections_off"]) + [f"set up with {flag}" for flag in status["lowered"]]
    off += [f"{status['forced_keeps']} forced keep(s)"] if status["forced_keeps"] else []
    if status["protections"] and status["protections"].get("train_command") == "custom":
        off.append("a custom training command")
    return [f"protections off: {'; '.join(off)} (such results are never verified)" if off
            else "protections: sandbox, hidden evaluation data, PID namespace, referee and measured compute all on"]


def held_out_report():
    """The val/test pairs of each new best, and the trend of their gap (lines for a human)."""
    records = common.read_json(common.HELDOUT_FILE) or []
    if not records:
        return ["held-out test: nothing scored yet (each new best is scored when it is kept)"]
    lines = ["held-out test split, scored for each new best by prepare.py (the agent never sees it):",
             "id    commit   val_bpb   test_bpb  gap (test - val of that model)"]
    for record in records:
        test = f"{record['test_bpb']:.6f}" if record["test_bpb"] is not None else "  failed"
        gap = f"{record['gap']:+.6f}" if record["gap"] is not None else f"({record['error']})"
        lines.append(f"{record['id']}  {record['commit']}  {record['val_bpb']:.6f}  {test}  {gap}  {record['description']}")
    gaps = [record["gap"] for record in records if record["gap"] is not None]
    if len(gaps) >= 2:
        change = gaps[-1] - gaps[0]
        trend = "widening: decisions may be overfitting the validation shard" if change > 0 else "not widening"
        lines.append(f"gap {gaps[0]:+.6f} at the first best, {gaps[-1]:+.6f} now ({change:+.6f}: {trend})")
    return lines


def main():
    parser = argparse.ArgumentParser(description="Show where the research session stands.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--report", action="store_true",
                        help="for the human: add the val/test gap of each new best (held-out check)")
    args = parser.parse_args()
    status = gather()
    if args.json:
        if args.report:
            status["held_out"] = common.read_json(common.HELDOUT_FILE) or []
        print(json.dumps(status, sort_keys=True))
    else:
        print_text(status)
        if args.report:
            print("\n".join(protections_report(status) + held_out_report()))
    return 0


if __name__ == "__main__":
    common.run_main(main)
