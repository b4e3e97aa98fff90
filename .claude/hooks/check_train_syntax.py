#!/usr/bin/env python3
"""PostToolUse hook: after an edit of train.py, check that it still parses.

Why: a typo found by the experiment costs a whole run slot (start-up, a crash row, a reset); found
here it costs a few milliseconds and the agent fixes it at once. Only the syntax is checked
(`compile`, no import: importing train.py would start torch and cost seconds).

On a syntax error it answers {"decision": "block", "reason": ...}, which Claude Code hands to the
agent after the edit; otherwise it prints nothing.

Usage: python3 .claude/hooks/check_train_syntax.py < payload.json
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from research_state import project_root  # noqa: E402


def main():
    try:
        payload = json.load(sys.stdin)
    except ValueError:
        return 0
    root = project_root()
    tool_input = payload.get("tool_input") or {}
    path = tool_input.get("file_path") or tool_input.get("notebook_path") or ""
    train = os.path.join(root, "train.py")
    if not path or os.path.realpath(os.path.join(payload.get("cwd") or root, path)) != os.path.realpath(train):
        return 0
    try:
        with open(train, encoding="utf-8") as handle:
            compile(handle.read(), "train.py", "exec")
    except OSError:
        return 0
    except (SyntaxError, ValueError) as error:
        where = f"line {error.lineno}: " if getattr(error, "lineno", None) else ""
        json.dump({"decision": "block", "reason": (
            f"train.py no longer parses ({where}{getattr(error, 'msg', error)}): "
            'fix it before `uv run scripts/experiment.py "DESCRIPTION"`.'
        )}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
