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


@pytest.fixture
def project(tmp_path):
    (tmp_path / "train.py").write_text("print('train')\n")
    (tmp_path / "prepare.py").write_text("print('prepare')\n")
    (tmp_path / "run.log").write_text("step\n" * 500)
    (tmp_path / "notes.md").write_text(NOTES)
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "common.py", tmp_path / "scripts" / "common.py")  # the hooks read state through it
    (tmp_path / ".claude" / "context" / "memory").mkdir(parents=True)
    return tmp_path


def start_session(project, rows=(), **session):
    (project / "runs").mkdir(exist_ok=True)
    base = {"tag": "nov23", "branch": "autoresearch/nov23", "started_at": "2026-11-23T00:00:00Z"}
    (project / "runs" / "session.json").write_text(json.dumps(dict(base, **session)))
    lines = ["commit\tval_bpb\tmemory_gb\tstatus\tdescription"] + ["\t".join(row) for row in rows]
    (project / "results.tsv").write_text("\n".join(lines) + "\n")


def run_hook(name, payload, project, env=None):
    environment = dict(os.environ, CLAUDE_PROJECT_DIR=str(project))
    environment.pop("AUTORESEARCH_MAINTAINER", None)
    environment.pop("AUTORESEARCH_HEADLESS", None)
    environment.update(env or {})
    result = subprocess.run(
        [sys.executable, str(HOOKS / name)], input=json.dumps(payload), capture_output=True,
        text=True, env=environment, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if result.stdout.strip() else None


def guard(tool_name, tool_input, project):
    """The deny reason the guard gives, or None when the call is allowed."""
    payload = {"session_id": "s", "hook_event_name": "PreToolUse", "cwd": str(project),
               "tool_name": tool_name, "tool_input": tool_input}
    output = run_hook("guard_tool_use.py", payload, project)
    if output is None:
        return None
    decision = output["hookSpecificOutput"]
    assert decision["permissionDecision"] == "deny"
    return decision["permissionDecisionReason"]


# ---------------------------------------------------------------------------------------------
# PreToolUse guard: a table of tool calls. `None` means allowed; a string is a word that the
# one-line reason must contain (the command to use instead, or what is wrong).

BASH_CASES = [
    # the helpers and ordinary reading are allowed
    ("uv run scripts/status.py", None),
    ('uv run scripts/experiment.py "raise lr to 0.05"', None),
    ("uv run scripts/decide.py keep", None),
    ("uv run scripts/memory.py search 'learning rate'", None),
    ("grep '^val_bpb:' run.log", None),
    ("grep -c step run.log && uv run scripts/status.py", None),
    ("tail -n 50 run.log", None),
    ("tail -20 run.log", None),
    ("tail run.log", None),
    ("head -n 30 run.log | grep loss", None),
    ("git status && git log --oneline -5", None),
    ("git diff HEAD~1 -- train.py", None),
    ("git checkout train.py", None),
    ("cat train.py", None),
    ("echo 'git push is forbidden; cat run.log too'", None),
    ('echo "tail -n 500 run.log"', None),
    ("uv run prepare.py --dataset builtin", None),
    ("ls runs/ > /tmp/listing.txt", None),
    ("cat <<'EOF' >> notes.md\nit's a lesson; git push would be bad\nEOF", None),
    ("python3 -c 'import ast; ast.parse(open(\"train.py\").read())'", None),
    # whole logs
    ("cat run.log", "tail -n 50"),
    ("less runs/0003-abc1234/run.log", "tail -n 50"),
    ("tail -n 200 run.log", "tail -n 50"),
    ("tail -n +1 run.log", "tail -n 50"),
    ("tail -f run.log", "tail -n 50"),
    ("head -100 run.log", "tail -n 50"),
    ("cat run.log | tail -5", "tail -n 50"),
    ("ls && cat run.log", "tail -n 50"),
    ("true; (cd runs && cat 0001-abc/run.log)", "tail -n 50"),
    ("echo $(cat run.log)", "tail -n 50"),
    ('echo "$(tail -n 1000 run.log)"', "tail -n 50"),
    ("x=`cat run.log`", "tail -n 50"),
    ("bash -c 'cat run.log'", "tail -n 50"),
    ("sh -c \"ls; tail -n 99 run.log\"", "tail -n 50"),
    ("eval cat run.log", "tail -n 50"),
    ("uv run scripts/status.py\ncat run.log", "tail -n 50"),
    # git: push, ledger, history
    ("git push", "nothing leaves"),
    ("git push origin autoresearch/nov23", "nothing leaves"),
    ("git -C . push --force", "nothing leaves"),
    ("uv run scripts/status.py && git push", "nothing leaves"),
    ("bash -c 'git add train.py && git push'", "nothing leaves"),
    ("bash <<EOF\ngit push\nEOF", "nothing leaves"),
    ("git add results.tsv", "decide.py"),
    ("git add -f results.tsv run.log", "decide.py"),
    ("git commit -am 'try lr'", "experiment.py"),
    ("git add train.py && git commit -m x", "experiment.py"),
    ("git reset --hard HEAD~1", "decide.py discard"),
    ("git checkout abc1234", "decide.py backtrack"),
    ("git rebase -i HEAD~3", "decide.py"),
    ("git clean -fdx", "untracked ledger"),
    # running training by hand
    ("uv run train.py", "experiment.py"),
    ("uv run train.py > run.log 2>&1", "experiment.py"),
    ("timeout 600 python train.py", "experiment.py"),
    # packages
    ("pip install flash-attn", "pyproject.toml"),
    ("python -m pip install einops", "pyproject.toml"),
    ("uv add einops", "pyproject.toml"),
    ("uv pip install einops", "pyproject.toml"),
    ("uv run --with einops scripts/status.py", "pyproject.toml"),
    ("sudo apt-get install -y htop", "pyproject.toml"),
    # network
    ("curl -sL https://example.com/paper.pdf -o paper.pdf", "network"),
    ("wget https://example.com/x", "network"),
    ("ls | xargs -n1 ssh host", "network"),
    ("git clone https://github.com/karpathy/nanochat /tmp/n", "network"),
    # shell writes outside train.py and the memory files
    ("echo '# tweak' >> prepare.py", "referee"),
    ("sed -i 's/2048/4096/' prepare.py", "referee"),
    ("cp /tmp/other.py prepare.py", "referee"),
    ("printf 'x' | tee scripts/decide.py", "research org"),
    ("echo 'abc\t0.9\t1.0\tkeep\tfake' >> results.tsv", "decide.py"),
    ("rm -rf runs", "decide.py"),
    ("touch STOP", "Only the human"),
    ("sed -i 's/0.04/0.05/' train.py", None),
    ("echo '- lesson' >> .claude/context/memory/learnings.md", None),
    # secrets
    ("cat ~/.ssh/id_ed25519", "Secrets"),
    ("grep KEY .env", "Secrets"),
    # unparseable
    ("echo 'unbalanced", "parse"),
]


@pytest.mark.parametrize("command,expected", BASH_CASES, ids=[case[0][:60] for case in BASH_CASES])
def test_guard_bash(project, command, expected):
    reason = guard("Bash", {"command": command, "description": "test"}, project)
    if expected is None:
        assert reason is None, reason
    else:
        assert reason is not None, f"not blocked: {command!r}"
        assert expected in reason
        assert "\n" not in reason  # one line


def file_cases(project):
    root = str(project)
    return [
        ("Edit", {"file_path": f"{root}/train.py", "old_string": "a", "new_string": "b"}, None),
        ("Write", {"file_path": f"{root}/notes.md", "content": "x"}, None),
        ("Write", {"file_path": f"{root}/REPORT.md", "content": "x"}, None),
        ("Edit", {"file_path": f"{root}/.claude/context/memory/learnings.md", "old_string": "a", "new_string": "b"}, None),
        ("MultiEdit", {"file_path": f"{root}/train.py", "edits": []}, None),
        ("Edit", {"file_path": f"{root}/prepare.py", "old_string": "a", "new_string": "b"}, "referee"),
        ("Write", {"file_path": f"{root}/scripts/decide.py", "content": "x"}, "research org"),
        ("Write", {"file_path": f"{root}/program.md", "content": "x"}, "research org"),
        ("Edit", {"file_path": f"{root}/.claude/settings.json", "old_string": "a", "new_string": "b"}, "research org"),
        ("Write", {"file_path": f"{root}/.claude/hooks/guard_tool_use.py", "content": "x"}, "research org"),
        ("Write", {"file_path": f"{root}/results.tsv", "content": "x"}, "decide.py"),
        ("Write", {"file_path": f"{root}/train_v2.py", "content": "x"}, "not part of the experiment"),
        ("Write", {"file_path": f"{root}/../elsewhere.py", "content": "x"}, "train.py"),
        ("NotebookEdit", {"notebook_path": f"{root}/explore.ipynb", "new_source": "x"}, "train.py"),
        ("Read", {"file_path": f"{root}/train.py"}, None),
        ("Read", {"file_path": f"{root}/run.log", "offset": 450, "limit": 50}, None),
        ("Read", {"file_path": f"{root}/run.log"}, "limit"),
        ("Read", {"file_path": f"{root}/runs/0001-abc/run.log", "limit": 2000}, "limit"),
        ("Read", {"file_path": os.path.expanduser("~/.ssh/id_rsa")}, "Secrets"),
        ("Glob", {"pattern": "**/*.py"}, None),
    ]


def test_guard_file_tools(project):
    failures = []
    for tool, tool_input, expected in file_cases(project):
        reason = guard(tool, tool_input, project)
        if (expected is None) != (reason is None) or (expected and expected not in reason):
            failures.append((tool, tool_input, expected, reason))
    assert not failures


def test_guard_table_is_large_enough(project):
    assert len(BASH_CASES) + len(file_cases(project)) >= 40


def test_guard_maintainer_switch_allows_everything(project):
    payload = {"tool_name": "Bash", "tool_input": {"command": "git push"}, "cwd": str(project)}
    assert run_hook("guard_tool_use.py", payload, project, env={"AUTORESEARCH_MAINTAINER": "1"}) is None


def test_guard_ignores_malformed_input(project):
    result = subprocess.run([sys.executable, str(HOOKS / "guard_tool_use.py")], input="not json",
                            capture_output=True, text=True, env=dict(os.environ, CLAUDE_PROJECT_DIR=str(project)))
    assert result.returncode == 0 and result.stdout == ""


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
    assert "REASONING" in guard("Bash", {"command": f"git status && {RUN}"}, project)
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
