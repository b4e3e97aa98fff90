"""`loop.py start --agent claude` against the real Claude Code CLI (node_modules/.bin/claude) and a
scripted model on 127.0.0.1 (tests/scripted_model.py): the command line and prompt the loop
builds, its edit of train.py through the real hooks, the tools it is refused, the JSON answer,
and a headless end (AUTORESEARCH_HEADLESS=1: the Stop hook lets the one-iteration run finish).

The workspace and the CLI come from test_claude_cli.py (a copy of this working tree as its own
repository, a temporary HOME, the CLI required under AUTORESEARCH_REQUIRE_CLAUDE=1)."""

import json
import subprocess
import sys

from loop_repo import BOWL, description
from scripted_model import ScriptedModel, new_text, text, tool_results, tool_use
from test_claude_cli import claude, workspace  # noqa: F401  (pytest fixtures)

ANSWER = {"hypothesis": "a higher Muon learning rate trains faster in 60 s", "description": "matrix lr 0.03 -> 0.045"}


def test_the_loop_drives_the_real_claude_cli(claude, workspace):  # noqa: F811
    root, env = workspace
    env = dict(env, AUTORESEARCH_TRAIN_COMMAND=f"{sys.executable} {BOWL}")
    train = root / "train.py"
    script = [
        tool_use("Bash", {"command": "python3 -c 'print(42)'", "description": "a shell command the hooks allow"}),
        tool_use("Edit", {"file_path": str(root / "prepare.py"), "old_string": "import argparse",
                          "new_string": "import argparse  # faster eval"}),
        tool_use("Edit", {"file_path": str(train), "old_string": "    MATRIX_LR = 0.03",
                          "new_string": "    MATRIX_LR = 0.045"}),
        text("Raised the matrix learning rate.\n" + json.dumps(ANSWER)),
    ]
    with ScriptedModel(script) as model:
        result = subprocess.run(
            [sys.executable, "scripts/loop.py", "start", "--agent", "claude", "--agent-bin", claude,
             "--max-experiments", "1", "--noise-runs", "0", "--no-referee", "--max-turns", "8", "--agent-timeout", "120"],
            cwd=root, env=dict(env, ANTHROPIC_BASE_URL=model.url), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    rows = [line.split("\t") for line in (root / "results.tsv").read_text().splitlines()[1:]]
    assert [description(row) for row in rows] == ["baseline", "matrix lr 0.03 -> 0.045"]
    record = json.loads((root / "runs" / "loop" / "0001" / "iteration.json").read_text())
    call = record["agent_calls"][0]
    assert call["error"] is None and call["answer"]["hypothesis"] == ANSWER["hypothesis"]
    assert call["turns"] == 4 and call["exit_code"] == 0
    command = call["command"]
    assert command[0] == claude and command[1:3] == ["-p", "agent-1.prompt.md"]
    assert command[3:] == ["--output-format", "json", "--max-turns", "8", "--allowedTools", "Read,Glob,Grep,Edit,Write"]

    requests = model.agent_requests
    prompt = (root / call["prompt_file"]).read_text()
    assert prompt.startswith("# autoresearch: one headless iteration")
    assert prompt in json.dumps(requests[0]) or prompt[:2000] in new_text(requests[0])
    assert "program.md: how this research org works" in prompt and "name: ml-experiment-loop" in prompt

    [(bash, bash_refused)] = tool_results(requests[1])  # no Bash: the loop, not the agent, runs experiments
    assert bash_refused and "42" not in bash, bash  # not among --allowedTools: refused though the hooks allow it
    [(edit, edit_refused)] = tool_results(requests[2])  # the guard hook keeps the referee fixed
    assert edit_refused and "prepare.py is the fixed protocol" in edit
    [(_, train_refused)] = tool_results(requests[3])
    assert not train_refused
    assert len(requests) == 4  # the answer ended the run: no Stop hook continuation in headless mode
    assert "MATRIX_LR = 0.045" in subprocess.run(["git", "show", "HEAD:train.py"], cwd=root, capture_output=True,
                                                 text=True).stdout
