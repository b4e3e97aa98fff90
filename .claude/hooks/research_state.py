"""Read-only view of a research session's state, shared by the hooks in this folder.

Why a separate module: the Stop and SessionStart hooks both need the session, the ledger and
notes.md, and the formats must be read one way (DESIGN.md is the contract; scripts/common.py
writes these files). Standard library only and no subprocesses, because a hook runs on every
stop and every session start and must cost milliseconds.

Files (all untracked, at the project root):
    runs/session.json    tag, branch, started_at, optional deadline and max_experiments
    runs/pending.json    the experiment that awaits `uv run scripts/decide.py`
    results.tsv          the ledger: commit, val_bpb, memory_gb, status, description
    notes.md             the agent's working notes (sections from the notes template)
    STOP                 created by the human to let the agent stop
"""

import json
import os
import re
from datetime import datetime, timezone

EXPERIMENT_STATUSES = ("keep", "discard", "crash")  # `backtrack` rows rewind, they are not runs


def project_root(payload=None):
    """The project root: $CLAUDE_PROJECT_DIR, else the payload's cwd, else two folders up."""
    root = os.environ.get("CLAUDE_PROJECT_DIR")
    if not root and payload:
        root = payload.get("cwd")
    if not root:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.realpath(root)


def read_json(path):
    """A JSON object from `path`, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_session(root):
    return read_json(os.path.join(root, "runs", "session.json"))


def read_pending(root):
    return read_json(os.path.join(root, "runs", "pending.json"))


def read_ledger(root):
    """The ledger rows as dicts (header names as keys); [] when there is no ledger."""
    try:
        with open(os.path.join(root, "results.tsv"), encoding="utf-8") as handle:
            lines = [line.rstrip("\n") for line in handle if line.strip()]
    except OSError:
        return []
    if not lines:
        return []
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def count_experiments(rows):
    return sum(1 for row in rows if row.get("status") in EXPERIMENT_STATUSES)


def best_kept(rows):
    """The kept row with the lowest val_bpb, or None."""
    kept = []
    for row in rows:
        if row.get("status") != "keep":
            continue
        try:
            kept.append((float(row.get("val_bpb", "")), row))
        except ValueError:
            continue
    return min(kept, key=lambda pair: pair[0])[1] if kept else None


def parse_time(text):
    """An aware datetime from an ISO-8601 string ('Z' allowed; naive means UTC), or None."""
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def budget_spent(session, rows, now=None):
    """Why the session's own budget is over ('deadline ...' / '... experiments'), or None."""
    now = now or datetime.now(timezone.utc)
    deadline = parse_time(session.get("deadline"))
    if deadline and now >= deadline:
        return f"the deadline {session['deadline']} has passed"
    limit = session.get("max_experiments")
    if isinstance(limit, int) and limit > 0 and count_experiments(rows) >= limit:
        return f"{count_experiments(rows)} of max {limit} experiments are done"
    return None


def read_notes_sections(root):
    """notes.md split into {heading text: body}, for its `## ` sections; {} when missing."""
    try:
        with open(os.path.join(root, "notes.md"), encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        return {}
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)  # template guidance is not content
    sections = {}
    for match in re.finditer(r"^## +(.+?)\s*$\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S):
        sections[match.group(1).strip()] = match.group(2).strip()
    return sections


def find_section(sections, prefix):
    """The body of the first section whose heading starts with `prefix` (case-insensitive)."""
    for heading, body in sections.items():
        if heading.lower().startswith(prefix.lower()):
            return body
    return ""


def top_ideas(sections, count=3):
    """The first `count` items of the Ideas Queue, as one-line strings."""
    ideas = []
    for line in find_section(sections, "Ideas Queue").splitlines():
        match = re.match(r"^\s*(?:\d+[.)]|[-*])\s+(.*\S)", line)
        if match:
            ideas.append(match.group(1))
        if len(ideas) == count:
            break
    return ideas
