"""Read-only view of a research session's state, shared by the hooks in this folder.

The session, pending experiment and ledger are read through the project's own scripts/common.py,
the one module that writes them (one source of truth per format), so a hook can never
disagree with the helpers about the best result, a deadline or a pending decision. This module
adds what only the hooks need: the project root and the sections of notes.md. Standard library
only, no subprocesses: a hook runs on every stop and session start and must cost milliseconds.

Files (all untracked, at the project root): runs/session.json, runs/pending.json, results.tsv,
notes.md, and STOP (created by the human to let the agent stop).
"""

import importlib.util
import json
import os
import re

HOOKS_DIR = os.path.dirname(os.path.abspath(__file__))


class StateUnavailable(Exception):
    """scripts/common.py is missing or the session files are unreadable: hooks then stay out of the way."""


def project_root():
    """The project root: $CLAUDE_PROJECT_DIR (Claude Code sets it), else the folder this hook lives in,
    two levels up. Never the payload's cwd: Codex and OpenCode do not set CLAUDE_PROJECT_DIR, and an
    agent that ran `cd /tmp` must not move the project with it."""
    root = os.environ.get("CLAUDE_PROJECT_DIR") or os.path.dirname(os.path.dirname(HOOKS_DIR))
    return os.path.realpath(root)


def read_json(path):
    """A JSON object from `path`, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


_LOADED = {}  # root -> module: one hook call may ask twice


def load_common(root):
    """The project's scripts/common.py as a module (its paths are relative to that project)."""
    if root in _LOADED:
        return _LOADED[root]
    path = os.path.join(root, "scripts", "common.py")
    if not os.path.exists(path):
        raise StateUnavailable(f"{path} is missing")
    spec = importlib.util.spec_from_file_location("autoresearch_common", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # a broken helper module must not break every tool call
        raise StateUnavailable(str(error)) from error
    _LOADED[root] = module
    return module


def read_state(root):
    """{session, rows, pending, best, experiments, stop_reason, pending_message} or None without a session."""
    common = load_common(root)
    try:
        session = common.load_session()
        if session is None:
            return None
        rows = common.read_ledger()
        pending = common.load_pending()
        return {
            "session": session,
            "rows": rows,
            "pending": pending,
            "best": common.best_kept(rows),
            "experiments": len(common.experiments(rows)),
            "stop_reason": common.stop_reason(session, rows),
            "pending_message": common.pending_message(pending) if pending else None,
        }
    except Exception as error:  # common.Refusal on a malformed ledger, ValueError on a bad deadline
        raise StateUnavailable(str(error)) from error


def read_notes(root):
    """notes.md without its HTML comments (the template's guidance and examples), or "" when missing.
    The format is common.py's (hooks call this after read_state, so the module has loaded)."""
    try:
        with open(os.path.join(root, "notes.md"), encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        return ""
    return load_common(root).strip_comments(text)


def newest_log_block(root):
    """'REASONING', 'ANALYSIS' or None: the kind of the last Experiment Log block in notes.md."""
    blocks = load_common(root).LOG_BLOCK.findall(read_notes(root))
    return blocks[-1].upper() if blocks else None


def read_notes_sections(root):
    """notes.md split into {heading text: body}, for its `## ` sections; {} when missing."""
    text = read_notes(root)
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
