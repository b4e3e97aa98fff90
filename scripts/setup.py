"""Start a research session: branch, ledger, memory files, data check, protocol pin.

Creates branch autoresearch/<tag> from the current commit, writes the results.tsv header,
creates notes.md and .claude/context/memory/{learnings,issues,decisions}.md from the tracked
templates when they do not exist yet (never overwriting), checks that prepare.py has run, and
records runs/session.json, whose prepare_sha256 every later experiment checks. The ledger and
runs of an earlier session are moved to runs/archive/<old tag>/ first, so nothing is lost.

Usage:
    uv run scripts/setup.py [--tag TAG] [--deadline HOURS|ISO-TIME] [--max-experiments N]
"""

import argparse
import datetime
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MEMORY_FILES = {  # template name -> where setup puts it
    "notes.md": common.NOTES_FILE,
    "learnings.md": common.MEMORY_DIR / "learnings.md",
    "issues.md": common.MEMORY_DIR / "issues.md",
    "decisions.md": common.MEMORY_DIR / "decisions.md",
}


def default_tag():
    """Today's date the way upstream names sessions: nov23, mar5."""
    today = datetime.date.today()
    return f"{today.strftime('%b').lower()}{today.day}"


def parse_deadline(text):
    """A number of hours from now, or an ISO time; returned as ISO-8601 UTC."""
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        moment = now + datetime.timedelta(hours=float(text))
    except ValueError:
        try:
            moment = common.parse_iso(text)
        except ValueError:
            raise common.Refusal(f"--deadline {text!r} is neither hours (8) nor an ISO time "
                                 "(2026-11-24T07:00)") from None
    if moment <= now:
        raise common.Refusal(f"--deadline {text!r} is already past")
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="seconds")


def archive_previous_session():
    """Move an earlier session's ledger, session file and runs to runs/archive/<tag>/."""
    session = common.load_session() or {}
    run_dirs = sorted(common.RUNS_DIR.glob("[0-9][0-9][0-9][0-9]-*"))
    leftovers = [p for p in (common.LEDGER_FILE, common.SESSION_FILE, common.PROGRESS_PLOT) if p.exists()]
    if not (leftovers or run_dirs):
        return None
    name = session.get("tag") or "untagged"
    target, suffix = common.ARCHIVE_DIR / name, 1
    while target.exists():
        suffix += 1
        target = common.ARCHIVE_DIR / f"{name}-{suffix}"
    target.mkdir(parents=True)
    for path in leftovers + run_dirs:
        shutil.move(str(path), str(target / path.name))
    if common.RUN_LOG.is_symlink():
        common.RUN_LOG.unlink()
    return target


def create_memory_files():
    """Copy each memory template into place unless the file already exists."""
    created = []
    for template, target in MEMORY_FILES.items():
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        source = common.TEMPLATES_DIR / template
        if source.exists():
            shutil.copyfile(source, target)
        else:  # templates not installed: an empty file with a heading still gives the agent a place
            target.write_text(f"# {template[:-3].capitalize()}\n")
        created.append(target)
    return created


def main():
    parser = argparse.ArgumentParser(description="Start a research session on branch autoresearch/<tag>.")
    parser.add_argument("--tag", default=default_tag(),
                        help="session name; the branch is autoresearch/<tag> (default: today, e.g. nov23)")
    parser.add_argument("--deadline", help="stop after this many hours, or at this ISO time "
                        "(recorded for the Stop hook and the loop)")
    parser.add_argument("--max-experiments", type=int, metavar="N",
                        help="stop after N experiments (recorded for the Stop hook and the loop)")
    args = parser.parse_args()

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.tag) or ".." in args.tag:
        raise common.Refusal(f"--tag {args.tag!r}: use letters, digits, '.', '_' or '-'")
    if args.max_experiments is not None and args.max_experiments < 1:
        raise common.Refusal("--max-experiments must be at least 1")
    deadline = parse_deadline(args.deadline) if args.deadline else None
    branch = f"autoresearch/{args.tag}"
    if common.git("rev-parse", "-q", "--verify", f"refs/heads/{branch}", check=False):
        raise common.Refusal(f"branch {branch} already exists: choose another --tag")
    changed = common.changed_tracked_files()
    if changed:
        raise common.Refusal(f"uncommitted changes to tracked files ({', '.join(changed)}): "
                             "commit or revert them before starting a session")
    if not common.PREPARE_FILE.exists():
        raise common.Refusal(f"{common.PREPARE_FILE.name} is missing: the session pins its hash")
    pending = common.load_pending()
    if pending:
        raise common.Refusal(common.pending_message(pending) + " before starting a new session")
    manifest = common.require_manifest()

    archived = archive_previous_session()
    start_commit = common.head_commit()
    common.git("checkout", "-q", "-b", branch)
    common.ensure_ledger()
    create_memory_files()
    session = {
        "tag": args.tag,
        "branch": branch,
        "start_commit": start_commit,
        "prepare_sha256": common.sha256_file(common.PREPARE_FILE),
        "helper_sha256": common.helper_hashes(),
        "profile": manifest.get("profile"),
        "dataset": manifest.get("dataset"),
        "time_budget": manifest.get("time_budget"),
        "started_at": common.now_iso(),
        "deadline": deadline,
        "max_experiments": args.max_experiments,
    }
    common.write_json_atomic(common.SESSION_FILE, session)  # last: its existence means setup completed
    moved = f"; earlier session moved to {archived.relative_to(common.ROOT)}" if archived else ""
    print(f"session {args.tag}: branch {branch} at {start_commit[:7]}, profile {session['profile']}, "
          f"dataset {session['dataset']}, budget {session['time_budget']} s{moved}; "
          'next: uv run scripts/experiment.py "baseline"')


if __name__ == "__main__":
    common.run_main(main)
