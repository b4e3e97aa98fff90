#!/usr/bin/env python3
"""SessionStart hook: a compact picture of where the research stands, injected as context.

Why: an overnight session is resumed, cleared and compacted many times; without this, each
restart spends its first minutes (and a lot of context) re-reading the ledger and notes, or worse,
starts over. This prints the branch, the best result, the last ledger rows, a pending decision,
the Best Known Config and the top ideas from notes.md: a few hundred tokens, enough to carry on.
Without a research session it only points at program.md.

Output: {"hookSpecificOutput": {"hookEventName": "SessionStart", "additionalContext": "..."}}.

Usage: python3 .claude/hooks/brief_session.py < payload.json
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from research_state import (  # noqa: E402
    StateUnavailable,
    find_section,
    project_root,
    read_notes_sections,
    read_state,
    top_ideas,
)

LAST_ROWS = 5
MAX_SECTION_LINES = 12  # Best Known Config is meant to be short; cut it if it is not
MAX_CHARS = 3000  # the whole briefing stays a small fraction of the context
NO_SESSION = (
    "autoresearch: no research session is active. To start one, read program.md and run "
    "`uv run scripts/setup.py --tag TAG` (the ml-experiment-loop skill has the full loop)."
)


def briefing(root):
    try:
        state = read_state(root)
    except StateUnavailable as error:
        return f"autoresearch: the session state is unreadable ({error}); run `uv run scripts/status.py`."
    if state is None:
        return NO_SESSION
    session, rows = state["session"], state["rows"]
    lines = [f"autoresearch session '{session.get('tag', '?')}' on branch {session.get('branch', '?')}, "
             f"started {session.get('started_at', '?')}."]
    limits = []
    if session.get("deadline"):
        limits.append(f"deadline {session['deadline']}")
    if session.get("max_experiments"):
        limits.append(f"max {session['max_experiments']} experiments")
    if limits:
        lines.append("Budget: " + ", ".join(limits) + ".")
    over = state["stop_reason"] or ("a STOP file exists" if os.path.exists(os.path.join(root, "STOP")) else None)
    if over:
        lines.append(f"The session is over ({over}): write the morning report (research-report skill).")
    best = state["best"]
    best_text = f"val_bpb {best.val_bpb:.6f} at {best.commit} ({best.description})" if best else "none yet (run the baseline)"
    lines.append(f"Experiments: {state['experiments']}; best kept: {best_text}")
    if rows:
        lines.append("Last rows (commit, val_bpb, memory_gb, status, description):")
        for row in rows[-LAST_ROWS:]:
            lines.append(f"  {row.commit}\t{row.val_bpb:.6f}\t{row.memory_gb:.1f}\t{row.status}\t{row.description}")
    if state["pending"]:
        lines.append(f"Pending: {state['pending_message']} (write its ANALYSIS in notes.md first).")
    sections = read_notes_sections(root)
    config = find_section(sections, "Best Known Config").splitlines()[:MAX_SECTION_LINES]
    if config:
        lines.append("Best Known Config (notes.md):")
        lines.extend("  " + line for line in config if line.strip())
    ideas = top_ideas(sections, count=3)
    if ideas:
        lines.append("Top ideas (notes.md Ideas Queue):")
        lines.extend(f"  {number}. {idea}" for number, idea in enumerate(ideas, 1))
    lines.append("Carry on with the loop of program.md; `uv run scripts/memory.py search \"QUERY\"` finds past lessons.")
    text = "\n".join(lines)
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 3] + "..."


def main():
    sys.stdin.read()  # the payload: nothing in it is needed (the project root comes from this file's place)
    json.dump({"hookSpecificOutput": {
        "hookEventName": "SessionStart",
        "additionalContext": briefing(project_root()),
    }}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
