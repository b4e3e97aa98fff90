"""The repository's OpenCode configuration (opencode.json and its guard plugin) under the real
OpenCode CLI (node_modules/.bin/opencode, pinned in package-lock.json), driven by a scripted Chat
Completions model on 127.0.0.1 (tests/scripted_openai.py).

Each test runs in a copy of this working tree after setup (test_claude_cli.workspace) with a
temporary HOME and XDG folders. The scripted provider comes in OPENCODE_CONFIG_CONTENT, so the
project's opencode.json is the one the repository ships. OpenCode installs @opencode-ai/plugin
into each config folder before it loads plugins; its user folder here is made to look installed,
as on any machine where OpenCode has run once, so that nothing waits on the network. Without the
CLI these tests skip, unless AUTORESEARCH_REQUIRE_CLIENTS=1 (as in .ci/run).
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import client_binary  # noqa: E402
from loop_repo import BOWL, description  # noqa: E402
from scripted_openai import ScriptedOpenAI, all_text, text, tool_outputs, tool_use  # noqa: E402
from test_claude_cli import start_session, workspace  # noqa: E402, F401  (pytest fixture)

REPO = Path(__file__).resolve().parent.parent
PLUGIN_VERSION = "1.18.33"  # the opencode-ai version in package-lock.json
# OpenCode's skill and search tools run ripgrep: `rg` from PATH, else one it downloads. Offline,
# the one Codex's npm package carries (pinned in the same lock) stands in for a system ripgrep.
RIPGREP = next((REPO / "node_modules" / "@openai").glob("codex-linux-*/vendor/*/codex-path/rg"), None)
ANSWER = {"hypothesis": "a higher Muon learning rate trains faster in a short budget",
          "description": "matrix lr 0.03 -> 0.045"}


@pytest.fixture(scope="module")
def opencode():
    return client_binary("opencode", "OpenCode", "AUTORESEARCH_REQUIRE_CLIENTS")


@pytest.fixture
def project(workspace):  # noqa: F811
    root, env = workspace
    home = Path(env["HOME"])
    path = env["PATH"] if RIPGREP is None else f"{RIPGREP.parent}{os.pathsep}{env['PATH']}"
    env = dict(env, PATH=path, PWD=str(root), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_DATA_HOME=str(home / ".local/share"), XDG_CACHE_HOME=str(home / ".cache"),
               XDG_STATE_HOME=str(home / ".local/state"),
               OPENCODE_DISABLE_AUTOUPDATE="1", OPENCODE_DISABLE_MODELS_FETCH="1", OPENCODE_DISABLE_LSP_DOWNLOAD="1")
    user = home / ".config" / "opencode"  # as OpenCode leaves it after its one install there
    (user / "node_modules").mkdir(parents=True)
    dependencies = {"@opencode-ai/plugin": PLUGIN_VERSION}
    (user / "package.json").write_text(json.dumps({"dependencies": dependencies}))
    (user / "package-lock.json").write_text(json.dumps({"lockfileVersion": 3,
                                                        "packages": {"": {"dependencies": dependencies}}}))
    return root, env


def provider(model):
    return json.dumps({"model": "scripted/m", "provider": {"scripted": {
        "npm": "@ai-sdk/openai-compatible", "name": "scripted",
        "options": {"baseURL": f"{model.url}/v1", "apiKey": "not-a-real-key"},
        "models": {"m": {"name": "m", "tool_call": True}}}}})


def run_opencode(opencode, root, env, script, prompt="have a look at program.md and kick off a new experiment"):
    with ScriptedOpenAI(script) as model:
        started = time.monotonic()
        result = subprocess.run([opencode, "run", prompt], cwd=root, capture_output=True, text=True,
                                env=dict(env, OPENCODE_CONFIG_CONTENT=provider(model)), stdin=subprocess.DEVNULL,
                                timeout=120)
    return result, model, time.monotonic() - started


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_agents_md_and_the_skills_reach_the_model(opencode, project):
    root, env = project
    script = [tool_use("skill", {"name": "ml-experiment-loop"}), text("Nothing to do.")]
    result, model, seconds = run_opencode(opencode, root, env, script, prompt="hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Nothing to do."
    [skill] = tool_outputs(model.agent_requests[1])  # the skill loads through the guard plugin
    assert "name: ml-experiment-loop" in skill or "uv run scripts/experiment.py" in skill, skill[:500]
    # No npm install at start-up (offline it cost 75 s): OpenCode installs into .opencode/ folders,
    # and the guard plugin lives outside them. Checked by what is on disk, not by the clock (this VM's
    # speed varies tenfold within an hour).
    assert not (root / ".opencode" / "node_modules").exists(), seconds
    first = all_text(model.agent_requests[0])
    assert "If you were asked to do research" in first  # AGENTS.md, in the system prompt
    assert "ml-experiment-loop" in first and "research-report" in first  # the skills
    assert not (root / ".opencode").exists()  # so OpenCode has no project folder to install into


def test_the_rules_are_refused_by_machine_and_train_py_is_not(opencode, project, tmp_path):
    root, env = project
    start_session(root, env)
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    subprocess.run(["git", "remote", "add", "origin", str(remote)], cwd=root, check=True)
    (root / "run.log").write_text("SECRET-LOG-LINE\n" * 500)
    before = {name: sha256(root / name) for name in ("prepare.py", "scripts/common.py")}

    def bash(command):
        return tool_use("bash", {"command": command, "description": "a step"})

    script = [
        bash("cat run.log"),
        tool_use("edit", {"filePath": str(root / "prepare.py"), "oldString": "import argparse",
                          "newString": "import argparse  # faster eval"}),
        bash("sed -i 's/^import/import  # patched/' scripts/common.py"),
        bash("git push origin HEAD:refs/heads/stolen"),
        bash("pip install einops"),
        tool_use("edit", {"filePath": str(root / "train.py"), "oldString": "    MATRIX_LR = 0.03",
                          "newString": "    MATRIX_LR = 0.045"}),
        text("Done."),
    ]
    result, model, seconds = run_opencode(opencode, root, env, script)
    assert result.returncode == 0, result.stderr
    outputs = [" ".join(tool_outputs(request)) for request in model.agent_requests[1:]]
    assert len(outputs) == len(script) - 1, outputs
    log, prepare, scripts, push, install, train = outputs
    # the guard's reasons, thrown by the plugin (opencode.json would refuse the edit, push and
    # install too, but not the log read or the sed: permissions see commands, not what they touch)
    assert "Do not read whole logs" in log and "SECRET-LOG-LINE" not in log
    assert "prepare.py" in prepare and "Edit applied" not in prepare
    assert "scripts/common.py" in scripts
    assert "push" in push and "stolen" not in push
    assert "packages" in install.lower() and "Successfully installed" not in install
    assert {name: sha256(root / name) for name in before} == before
    refs = subprocess.run(["git", "for-each-ref"], cwd=remote, capture_output=True, text=True, check=True).stdout
    assert refs == ""
    assert "Edit applied" in train and "    MATRIX_LR = 0.045" in (root / "train.py").read_text()


def test_the_loop_drives_the_real_opencode_cli(opencode, project, tmp_path):
    """`loop.py start --agent opencode`: one iteration, committed, trained (fake trainer) and
    recorded. The loop is started with the PWD of another repository: OpenCode takes its project
    from $PWD, and would work there (without this project's rules; its edits here refused as
    outside the project) if the loop did not give it a PWD equal to its cwd."""
    root, env = project
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["git", "init", "-q", str(elsewhere)], check=True)
    env = dict(env, AUTORESEARCH_TRAIN_COMMAND=f"{sys.executable} {BOWL}")
    script = [
        tool_use("edit", {"filePath": str(root / "prepare.py"), "oldString": "import argparse",
                          "newString": "import argparse  # faster eval"}),
        tool_use("edit", {"filePath": str(root / "train.py"), "oldString": "    MATRIX_LR = 0.03",
                          "newString": "    MATRIX_LR = 0.045"}),
        text("Raised the matrix learning rate.\n" + json.dumps(ANSWER)),
    ]
    prepare = sha256(root / "prepare.py")
    with ScriptedOpenAI(script) as model:
        result = subprocess.run(
            [sys.executable, "scripts/loop.py", "start", "--agent", "opencode", "--agent-bin", opencode,
             "--max-experiments", "1", "--noise-runs", "0", "--no-referee", "--agent-timeout", "120"],
            cwd=root, env=dict(env, OPENCODE_CONFIG_CONTENT=provider(model), PWD=str(elsewhere)),
            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split("\t") for line in (root / "results.tsv").read_text().splitlines()[1:]]
    assert [description(row) for row in rows] == ["baseline", ANSWER["description"]]
    call = json.loads((root / "runs" / "loop" / "0001" / "iteration.json").read_text())["agent_calls"][0]
    assert call["error"] is None and call["answer"]["hypothesis"] == ANSWER["hypothesis"]
    assert call["command"][:2] == [opencode, "run"]
    [prepare_output] = tool_outputs(model.agent_requests[1])
    assert "prepare.py" in prepare_output and "Edit applied" not in prepare_output  # refused
    assert sha256(root / "prepare.py") == prepare
    shown = subprocess.run(["git", "show", "HEAD:train.py"], cwd=root, capture_output=True, text=True).stdout
    assert "    MATRIX_LR = 0.045" in shown
