"""Every agent works in its own worktree, whatever PWD it was started under.

OpenCode takes its project from $PWD, not from the process's working directory: started with a
lane's worktree as its cwd but the main checkout's PWD, it worked in the main checkout. So lanes.py
and loop.py give each process they start a PWD equal to its cwd. Here two local lanes run a fake
agent that, like OpenCode, edits train.py under $PWD, started by a lanes.py that inherited the
main checkout's PWD: each lane's experiment must land in its own worktree and ledger, the main
checkout must stay as it was.
"""

import json
import os
import sys

from lanes_repo import FAKE_LOOP, FAKE_TRAIN, LanesRepo

AGENT = '''
import json, os, re, sys
from pathlib import Path
with open(os.environ["FAKE_AGENT_TRACE"], "a") as trace:
    trace.write(json.dumps({"pwd": os.environ.get("PWD"), "cwd": os.getcwd()}) + "\\n")
train = Path(os.environ["PWD"]) / "train.py"  # where OpenCode would edit: its project is $PWD
text = train.read_text()
train.write_text(re.sub(r"^(\\s*)MATRIX_LR = ([0-9.]+)", lambda m: f"{m.group(1)}MATRIX_LR = {float(m.group(2)) * 1.5:g}",
                        text, count=1, flags=re.M))
print(json.dumps({"hypothesis": "a higher matrix learning rate", "description": "matrix lr x1.5"}))
'''


def test_each_lane_agent_edits_its_own_worktree_under_an_inherited_pwd(tmp_path):
    repo = LanesRepo(tmp_path / "repo", fake_seconds=0.2)
    agent, trace = tmp_path / "agent.py", tmp_path / "agent-trace.jsonl"
    agent.write_text(AGENT)
    main_train = (repo.path / "train.py").read_text()
    env = {"FAKE_AGENT_TRACE": str(trace), "PWD": str(repo.path)}  # what a shell in the main checkout passes on
    repo.lanes("start", "2", "--backend", "local", "--tag", "pwd", "--train-command", FAKE_TRAIN, "--", *FAKE_LOOP,
               "--agent-command", f"{sys.executable} {agent}", "--max-experiments", "1", "--timeout", "30", env=env)
    repo.wait_until_stopped(timeout=90)
    lanes = repo.lane_paths("pwd")
    calls = [json.loads(line) for line in trace.read_text().splitlines()]
    assert sorted(call["cwd"] for call in calls) == sorted(str(lane) for lane in lanes)
    assert all(call["pwd"] == call["cwd"] for call in calls), calls
    for lane in lanes:
        baseline, experiment = repo.rows(lane)
        assert experiment[4] == "matrix lr x1.5"
        assert repo.git("show", f"{experiment[0]}:train.py", cwd=lane) != main_train.rstrip("\n")
    assert (repo.path / "train.py").read_text() == main_train
    assert repo.git("status", "--porcelain", "--untracked-files=no") == ""
    assert os.environ.get("PWD") != str(lanes[0])  # the test's own PWD was never the lane's
