"""The hooks of .claude/hooks, run as Claude Code runs them: a subprocess with JSON on stdin.

Each test builds a small project in a temporary folder (train.py, prepare.py, a long run.log,
notes.md, and a session when one is needed) and points CLAUDE_PROJECT_DIR at it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOOKS = REPO / ".claude" / "hooks"

NOTES = """# Research notes

## Best Known Config

- commit: abc1234
- val_bpb: 0.991

## Ideas Queue (ranked)

<!-- guidance that is not an idea -->
1. Raise the matrix learning rate from 0.04 to 0.05
2. Depth 10 at the same width

## Experiment Log
"""


def make_project(tmp_path):
    """The small project the hooks run against (shared with test_guard_table.py)."""
    (tmp_path / "train.py").write_text("print('train')\n")
    (tmp_path / "prepare.py").write_text("print('prepare')\n")
    (tmp_path / "run.log").write_text("step\n" * 500)
    (tmp_path / "notes.md").write_text(NOTES)
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "common.py", tmp_path / "scripts" / "common.py")  # the hooks read state through it
    (tmp_path / ".claude" / "context" / "memory").mkdir(parents=True)
    return tmp_path


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path)


def start_session(project, rows=(), **session):
    (project / "runs").mkdir(exist_ok=True)
    base = {"tag": "nov23", "branch": "autoresearch/nov23", "started_at": "2026-11-23T00:00:00Z"}
    (project / "runs" / "session.json").write_text(json.dumps(dict(base, **session)))
    lines = ["commit\tval_bpb\tmemory_gb\tstatus\tdescription"] + ["\t".join(row) for row in rows]
    (project / "results.tsv").write_text("\n".join(lines) + "\n")


def run_hook(name, payload, project, env=None, hooks=HOOKS):
    """Run one hook as the client does; its JSON answer, or None when it printed nothing. A refusal
    must come both ways: the JSON decision on stdout, and the same reason on stderr with exit 2."""
    environment = dict(os.environ, CLAUDE_PROJECT_DIR=str(project))
    for name_ in ("AUTORESEARCH_MAINTAINER", "AUTORESEARCH_HEADLESS", "AUTORESEARCH_ALLOW_INSTALL"):
        environment.pop(name_, None)
    environment.update(env or {})
    environment = {key: value for key, value in environment.items() if value is not None}
    result = subprocess.run(
        [sys.executable, str(hooks / name)], input=payload if isinstance(payload, str) else json.dumps(payload),
        capture_output=True, text=True, env=environment, timeout=30,
    )
    output = json.loads(result.stdout) if result.stdout.strip() else None
    if result.returncode == 2:
        assert output["hookSpecificOutput"]["permissionDecisionReason"] == result.stderr.strip()
    else:
        assert result.returncode == 0, result.stderr
    return output


def guard(tool_name, tool_input, project, cwd=None, env=None):
    """The deny reason the guard gives, or None when the call is allowed."""
    payload = {"session_id": "s", "hook_event_name": "PreToolUse", "cwd": str(cwd or project),
               "tool_name": tool_name, "tool_input": tool_input}
    output = run_hook("guard_tool_use.py", payload, project, env=env)
    if output is None:
        return None
    decision = output["hookSpecificOutput"]
    assert decision["permissionDecision"] == "deny"
    return decision["permissionDecisionReason"]


# The tables of allowed and refused tool calls are in test_guard_table.py.


# ---------------------------------------------------------------------------------------------
# Stop hook

ROW_KEEP = ("abc1234", "0.991000", "44.0", "keep", "baseline")
ROW_DISCARD = ("def5678", "0.995000", "44.0", "discard", "lr 0.08")


def stop(project):
    payload = {"session_id": "s", "hook_event_name": "Stop", "stop_hook_active": False, "cwd": str(project)}
    return run_hook("keep_researching.py", payload, project)


def test_stop_allowed_without_a_session(project):
    assert stop(project) is None


def test_stop_blocked_during_a_session_with_the_top_idea(project):
    start_session(project, [ROW_KEEP])
    output = stop(project)
    assert output["decision"] == "block"
    assert "Raise the matrix learning rate" in output["reason"]
    assert "uv run scripts/experiment.py" in output["reason"]
    assert "0.991000" in output["reason"]


def test_stop_asks_for_the_baseline_on_an_empty_ledger(project):
    start_session(project)
    assert "baseline" in stop(project)["reason"]


def test_stop_points_at_a_pending_decision(project):
    start_session(project, [ROW_KEEP])
    pending = {"id": 3, "state": "finished", "commit": "fff0000", "description": "depth 10"}
    (project / "runs" / "pending.json").write_text(json.dumps(pending))
    reason = stop(project)["reason"]
    assert "ANALYSIS" in reason and "uv run scripts/decide.py keep|discard" in reason


def test_stop_allowed_when_the_state_is_unreadable(project):
    start_session(project, [ROW_KEEP])
    (project / "results.tsv").write_text("not a ledger\n")
    assert stop(project) is None  # never trap the agent on a state we cannot read
    (project / "scripts" / "common.py").unlink()
    assert stop(project) is None


def test_stop_allowed_once_a_stop_file_exists(project):
    start_session(project, [ROW_KEEP])
    (project / "STOP").write_text("")
    assert stop(project) is None


def test_stop_allowed_in_a_headless_iteration(project):
    start_session(project, [ROW_KEEP])
    payload = {"hook_event_name": "Stop", "stop_hook_active": False, "cwd": str(project)}
    assert run_hook("keep_researching.py", payload, project, env={"AUTORESEARCH_HEADLESS": "1"}) is None


def test_stop_allowed_after_the_deadline(project):
    start_session(project, [ROW_KEEP], deadline="2020-01-01T06:00:00Z")
    assert stop(project) is None


def test_stop_blocked_before_the_deadline(project):
    start_session(project, [ROW_KEEP], deadline="2999-01-01T06:00:00+00:00")
    assert stop(project)["decision"] == "block"


def test_stop_allowed_after_max_experiments(project):
    start_session(project, [ROW_KEEP, ROW_DISCARD], max_experiments=2)
    assert stop(project) is None


def test_stop_gives_up_after_repeated_blocks_without_a_new_experiment(project):
    start_session(project, [ROW_KEEP])
    assert [stop(project) is not None for _ in range(4)] == [True, True, True, False]
    assert stop(project) is not None  # a resumed session gets its patience back


def test_stop_counter_resets_when_the_ledger_grows(project):
    start_session(project, [ROW_KEEP])
    for _ in range(3):
        assert stop(project) is not None
    start_session(project, [ROW_KEEP, ROW_DISCARD])
    assert [stop(project) is not None for _ in range(4)] == [True, True, True, False]


# ---------------------------------------------------------------------------------------------
# SessionStart hook


def brief(project, source="startup"):
    payload = {"session_id": "s", "hook_event_name": "SessionStart", "source": source, "cwd": str(project)}
    output = run_hook("brief_session.py", payload, project)["hookSpecificOutput"]
    assert output["hookEventName"] == "SessionStart"
    return output["additionalContext"]


def test_brief_without_a_session_points_at_program_md(project):
    text = brief(project)
    assert "program.md" in text and "uv run scripts/setup.py" in text


@pytest.mark.parametrize("source", ["startup", "resume", "clear", "compact"])
def test_brief_summarises_the_session(project, source):
    start_session(project, [ROW_KEEP, ROW_DISCARD], deadline="2999-01-01T06:00:00Z")
    text = brief(project, source)
    assert "autoresearch/nov23" in text
    assert "val_bpb 0.991000 at abc1234" in text
    assert "max" not in text and "deadline 2999" in text
    assert "lr 0.08" in text  # last rows
    assert "commit: abc1234" in text  # Best Known Config
    assert "Depth 10 at the same width" in text  # top ideas
    assert "guidance" not in text  # template comments are not content
    assert len(text) < 3000


def test_brief_says_when_the_session_is_over(project):
    start_session(project, [ROW_KEEP], max_experiments=1)
    assert "research-report" in brief(project)


# ---------------------------------------------------------------------------------------------
# PostToolUse syntax check of train.py


def after_edit(project, path):
    payload = {"session_id": "s", "hook_event_name": "PostToolUse", "tool_name": "Edit", "cwd": str(project),
               "tool_input": {"file_path": str(path)}, "tool_response": {"success": True}}
    return run_hook("check_train_syntax.py", payload, project)


def test_syntax_check_passes_a_valid_train_py(project):
    assert after_edit(project, project / "train.py") is None


def test_syntax_check_reports_a_broken_train_py(project):
    (project / "train.py").write_text("x = 1\ndef f(:\n    pass\n")
    output = after_edit(project, project / "train.py")
    assert output["decision"] == "block"
    assert "line 2" in output["reason"] and "train.py" in output["reason"]


def test_syntax_check_ignores_other_files(project):
    (project / "notes.md").write_text("def f(:\n")
    assert after_edit(project, project / "notes.md") is None


# ---------------------------------------------------------------------------------------------
# Memory protocol: REASONING before an experiment, ANALYSIS before a decision

REASONING = "\n### REASONING: depth 10\n- hypothesis: deeper is better\n- evidence: x\n- risk: y\n"
ANALYSIS = "\n### ANALYSIS: depth 10\n- result: worse\n- vs expected: worse\n- why: fewer steps\n- lesson: z\n"
RUN = 'uv run scripts/experiment.py "depth 10"'


def test_baseline_needs_no_reasoning(project):
    start_session(project)
    assert guard("Bash", {"command": 'uv run scripts/experiment.py "baseline"'}, project) is None


def test_experiment_needs_a_reasoning_block_first(project):
    start_session(project, [ROW_KEEP])
    assert "REASONING" in guard("Bash", {"command": RUN}, project)
    assert "on its own" in guard("Bash", {"command": f"git status && {RUN}"}, project)
    (project / "notes.md").write_text(NOTES + REASONING)
    assert guard("Bash", {"command": RUN}, project) is None
    (project / "notes.md").write_text(NOTES + REASONING + ANALYSIS)  # the last one was analysed already
    assert "REASONING" in guard("Bash", {"command": RUN}, project)


def test_decision_needs_an_analysis_block_first(project):
    start_session(project, [ROW_KEEP])
    (project / "runs" / "pending.json").write_text(json.dumps({"id": 2, "state": "finished", "description": "depth 10"}))
    (project / "notes.md").write_text(NOTES + REASONING)
    assert "ANALYSIS" in guard("Bash", {"command": "uv run scripts/decide.py discard"}, project)
    assert guard("Bash", {"command": "uv run scripts/decide.py backtrack abc1234"}, project) is None
    (project / "notes.md").write_text(NOTES + REASONING + ANALYSIS)
    assert guard("Bash", {"command": "uv run scripts/decide.py discard"}, project) is None


def test_a_confirmation_run_needs_no_new_reasoning(project):
    start_session(project, [ROW_KEEP])
    (project / "notes.md").write_text(NOTES + REASONING + ANALYSIS)  # analysed a marginal win
    assert guard("Bash", {"command": "uv run scripts/experiment.py --confirm"}, project) is None


def test_the_held_out_split_stays_hidden_from_the_agent(project):
    start_session(project, [ROW_KEEP])
    for command in ("cat runs/heldout.json", "uv run scripts/status.py --report",
                    "git status && python3 -c 'print(1)' | grep x runs/heldout.json"):
        assert "held-out" in guard("Bash", {"command": command}, project), command
    assert "held-out" in guard("Read", {"file_path": f"{project}/runs/heldout.json"}, project)
    assert guard("Bash", {"command": "uv run scripts/status.py"}, project) is None


def test_template_examples_do_not_count_as_blocks(project):
    start_session(project, [ROW_KEEP])
    (project / "notes.md").write_text((REPO / "skills" / "ml-experiment-loop" / "templates" / "notes.md").read_text())
    assert "REASONING" in guard("Bash", {"command": RUN}, project)
