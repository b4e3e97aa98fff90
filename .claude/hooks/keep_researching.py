#!/usr/bin/env python3
"""Stop hook: while a research session is active, turn "stop" into "continue" with the next step.

Why: the human is asleep, and the most common failure of an overnight agent is stopping after a
few experiments to ask "shall I continue?". Asking nicely in program.md is not enough, so this
hook answers the stop with {"decision": "block", "reason": ...}, and the reason becomes the
agent's next instruction: decide the pending experiment, or run the top of its Ideas Queue.

It lets the agent stop when
- a STOP file exists at the project root (the human's off switch),
- there is no research session (no runs/session.json: not started with `uv run scripts/setup.py`),
- the session's deadline or max_experiments (set at setup) has passed, or
- the headless orchestrator started this CLI for one iteration (AUTORESEARCH_HEADLESS=1 in the
  environment of `claude -p`, set by scripts/loop.py): there the loop, not the agent, goes on, or
- it has already blocked MAX_BLOCKS times in a row with no new ledger row in between: a stuck
  agent must not burn tokens all night. The count lives in runs/stop_hook.json (untracked) and
  starts again whenever the ledger grows.

Usage: python3 .claude/hooks/keep_researching.py < payload.json
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from research_state import (  # noqa: E402
    StateUnavailable,
    project_root,
    read_json,
    read_notes_sections,
    read_state,
    top_ideas,
)

MAX_BLOCKS = 3  # stops refused in a row without a new experiment before we let the agent go
COUNTER_FILE = os.path.join("runs", "stop_hook.json")


def write_counter(root, rows, blocks):
    """Save {ledger_rows, blocks} atomically (a half-written counter must not reset itself)."""
    path = os.path.join(root, COUNTER_FILE)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"ledger_rows": rows, "blocks": blocks}, handle)
    os.replace(temporary, path)


def next_step(root, state):
    """The instruction to give instead of stopping: decide, or run the next idea."""
    if state["pending"]:
        return f"Write the ANALYSIS block in notes.md; then: {state['pending_message']}."
    if not state["rows"]:
        return 'Run the baseline first: `uv run scripts/experiment.py "baseline"` on train.py as it is.'
    ideas = top_ideas(read_notes_sections(root), count=1)
    idea = f"the top of your Ideas Queue in notes.md: {ideas[0]}" if ideas else (
        "a new idea (your Ideas Queue in notes.md is empty: refill it, see the ml-experiment-loop skill)"
    )
    return (
        f"Next: {idea}. Write its REASONING block in notes.md, edit train.py, then run "
        '`uv run scripts/experiment.py "DESCRIPTION"`.'
    )


def decide(root):
    """None to let the agent stop, or the reason to give it for going on."""
    if os.path.exists(os.path.join(root, "STOP")) or os.environ.get("AUTORESEARCH_HEADLESS") == "1":
        return None
    try:
        state = read_state(root)
    except StateUnavailable:
        return None  # without readable state we cannot say what to do next: never trap the agent
    if state is None or state["stop_reason"]:
        return None
    rows = len(state["rows"])
    counter = read_json(os.path.join(root, COUNTER_FILE)) or {}
    blocks = counter.get("blocks", 0) if counter.get("ledger_rows") == rows else 0
    if blocks >= MAX_BLOCKS:
        write_counter(root, rows, 0)  # a human who resumes the session gets fresh patience
        return None
    write_counter(root, rows, blocks + 1)
    best = state["best"]
    standing = f"best val_bpb {best.val_bpb:.6f} ({best.commit})" if best else "no kept result yet"
    return (
        f"Do not stop: the research session is active and the human is asleep "
        f"({state['experiments']} experiments, {standing}). {next_step(root, state)} "
        "Only the human ends the session (by creating a STOP file)."
    )


def main():
    sys.stdin.read()  # the payload: nothing in it is needed (the project root comes from this file's place)
    reason = decide(project_root())
    if reason:
        json.dump({"decision": "block", "reason": reason}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
