"""The headless loop driving agent CLIs: fake ones that behave like `claude -p ... --output-format
json` (tests/fixtures/fake_agents) for every way an agent call can go wrong, and a generic
command template. The real Claude Code CLI is in test_loop_claude_cli.py."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loop_repo import AGENTS, PROJECT, LoopRepo, agent, check_consistent, description, ok


@pytest.fixture
def repo(tmp_path):
    return LoopRepo(tmp_path / "repo")


CLIENT_RULES = (".codex", "opencode.json", ".opencode-plugin", ".claude")  # what Codex and OpenCode run under


def with_client_rules(repo):
    """The repository's Codex and OpenCode configuration (and the guard they call), committed."""
    for name in CLIENT_RULES:
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(source, repo.path / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, repo.path / name)
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "client rules")
    return repo


def claude_fake(name, *extra):
    return ["--agent", "claude", "--agent-bin", agent(name), *extra]


def test_a_good_agent_is_recorded_with_its_cost_and_writes_the_plan_from_idea_md(repo):
    (repo.path / "IDEA.md").write_text("Find the best learning rates for the cpu profile.\n")
    ok(repo.start(*claude_fake("raises_lr.py"), "--max-experiments", "2"))
    rows = check_consistent(repo)
    assert [description(row) for row in rows[1:]] == ["matrix lr 0.03 -> 0.045", "matrix lr 0.045 -> 0.0675"]
    assert [row[3] for row in rows] == ["keep", "keep", "keep"]  # towards the fake trainer's optimum
    call = repo.record(1)["agent_calls"][0]
    assert call["cost_usd"] == 0.0125 and call["turns"] == 3 and call["error"] is None
    assert call["command"][:2] == [agent("raises_lr.py"), "-p"] and call["command"][2].endswith(".prompt.md")
    assert "--output-format" in call["command"] and "--max-turns" in call["command"]
    prompt = (repo.path / call["prompt_file"]).read_text()
    assert '"plan"' in prompt and "Find the best learning rates" in prompt
    assert "# program.md: how this research org works" in prompt and "name: ml-experiment-loop" in prompt
    assert "Edit train.py only" in prompt and "\tkeep\tbaseline" in prompt
    assert (repo.path / "PLAN.md").read_text().startswith("1. Tune MATRIX_LR upwards.")
    second = (repo.path / repo.record(2)["agent_calls"][0]["prompt_file"]).read_text()
    assert '"plan"' not in second and "Follow PLAN.md" in second and "[loop 0001] matrix lr 0.03 -> 0.045" in second
    assert "cost: $0.0250" in repo.report()


def test_an_agent_that_breaks_train_py_gets_one_repair_then_the_idea_is_discarded(repo):
    ok(repo.start(*claude_fake("breaks_train.py"), "--max-experiments", "2"))
    rows = check_consistent(repo)
    assert [(row[3], description(row)) for row in rows[1:]] == [("crash", "matrix lr 0.05 (broken)"),
                                                      ("crash", "matrix lr 0.05 (broken) (repair)")]
    record = repo.record(1)
    assert [call["kind"] for call in record["agent_calls"]] == ["propose", "repair"]
    assert record["outcome"] == "crash" and len(record["runs"]) == 2
    repair_prompt = (repo.path / record["agent_calls"][1]["prompt_file"]).read_text()
    assert "crashed: exception: SyntaxError" in repair_prompt
    assert repo.git("rev-parse", "HEAD").startswith(rows[0][0])  # back at the baseline


def test_a_repair_that_works_is_judged_like_any_experiment(repo):
    ok(repo.start(*claude_fake("breaks_train.py"), "--max-experiments", "2", env={"FAKE_REPAIR": "fix"}))
    rows = check_consistent(repo)
    assert [row[3] for row in rows[1:]] == ["crash", "keep"]
    assert description(rows[2]) == "matrix lr 0.05 (broken) (repair)"


def test_an_agent_that_edits_prepare_py_is_rejected(repo):
    before = (repo.path / "prepare.py").read_text()
    output = ok(repo.start(*claude_fake("edits_prepare.py"), "--max-failures", "2"))
    assert "2 iterations in a row without a result" in output
    rows = check_consistent(repo)
    assert len(rows) == 1 and (repo.path / "prepare.py").read_text() == before
    for number in (1, 2):
        record = repo.record(number)
        assert record["outcome"] == "rejected" and "changed prepare.py: only train.py may change" in record["reason"]
    assert "- 0002 rejected: it changed prepare.py" in repo.report()


def test_an_agent_that_hangs_is_killed_at_its_limit(repo, tmp_path):
    pids = tmp_path / "agent-pids"
    started = time.monotonic()
    ok(repo.start(*claude_fake("hangs.py", "--agent-timeout", "2"), "--max-failures", "1",
                 env={"FAKE_PID_FILE": str(pids)}))
    assert time.monotonic() - started < 60
    call = repo.record(1)["agent_calls"][0]
    assert call["timed_out"] and "no answer within --agent-timeout 2" in call["error"]
    for pid in map(int, pids.read_text().split()):
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] in "ZX", pid
    assert len(check_consistent(repo)) == 1


def test_malformed_json_is_a_clear_error_and_the_iteration_is_recorded(repo):
    ok(repo.start(*claude_fake("malformed.py"), "--max-failures", "1"))
    record = repo.record(1)
    assert record["outcome"] == "agent_error"
    assert record["reason"].startswith('the answer has no JSON object {"hypothesis": "...", "description": "..."}')
    assert "I raised the matrix learning rate" in record["reason"]
    assert len(check_consistent(repo)) == 1 and repo.git("status", "--porcelain") == ""
    notes = (repo.path / "notes.md").read_text()
    assert "### ANALYSIS: [loop 0001]" in notes and "not run: agent_error" in notes


def test_a_command_template_gets_the_prompt_file_and_its_plain_json_answer_counts(repo):
    template = f"{sys.executable} {AGENTS / 'raises_lr.py'} --prompt-file {{prompt_file}}"
    ok(repo.start("--agent-command", template, "--max-experiments", "1", env={"FAKE_PLAIN": "1"}))
    rows = check_consistent(repo)
    assert description(rows[1]) == "matrix lr 0.03 -> 0.045"
    call = repo.record(1)["agent_calls"][0]
    assert call["command"][-1].endswith("agent-1.prompt.md") and call.get("cost_usd") is None
    assert repo.state()["options"]["agent"] == "command"


def test_queued_instructions_go_to_the_agent(repo):
    (repo.path / "next_proposal.json").write_text(json.dumps(
        {"description": "human: higher matrix lr", "instructions": "Raise MATRIX_LR by half."}))
    ok(repo.start(*claude_fake("raises_lr.py"), "--max-experiments", "1"))
    rows = check_consistent(repo)
    assert description(rows[1]) == "human: higher matrix lr"
    prompt = (repo.path / repo.record(1)["agent_calls"][0]["prompt_file"]).read_text()
    assert "The human queued this experiment for you" in prompt and "Raise MATRIX_LR by half." in prompt


def test_the_agent_runs_headless_and_without_install_rights_unless_allowed(repo, tmp_path):
    probe = tmp_path / "probe.py"
    names = ("AUTORESEARCH_HEADLESS", "AUTORESEARCH_ALLOW_INSTALL")
    probe.write_text(f"import json, os\njson.dump({{k: os.environ.get(k) for k in {names!r}}}, "
                     f"open({str(tmp_path / 'env.json')!r}, 'w'))\nprint('no edit')\n")
    os.chmod(probe, 0o755)
    ok(repo.start("--agent-command", f"{sys.executable} {probe}", "--max-failures", "1"))
    assert json.loads((tmp_path / "env.json").read_text()) == {"AUTORESEARCH_HEADLESS": "1",
                                                              "AUTORESEARCH_ALLOW_INSTALL": None}
    ok(repo.loop("resume", "--allow-install", "--max-failures", "2"))
    assert json.loads((tmp_path / "env.json").read_text())["AUTORESEARCH_ALLOW_INSTALL"] == "1"
    assert "(--allow-install)" in repo.report()


def test_the_guard_hook_refuses_installs_unless_the_loop_allows_them():
    hook = Path(__file__).resolve().parent.parent / ".claude" / "hooks" / "guard_tool_use.py"
    payload = json.dumps({"tool_name": "Bash", "tool_input": {"command": "uv pip install einops"},
                          "cwd": str(hook.parent)})
    environment = {key: value for key, value in os.environ.items() if key != "AUTORESEARCH_ALLOW_INSTALL"}
    refused = subprocess.run([sys.executable, str(hook)], input=payload, capture_output=True, text=True,
                             env=environment).stdout
    assert "No new packages" in refused
    allowed = subprocess.run([sys.executable, str(hook)], input=payload, capture_output=True, text=True,
                             env=dict(environment, AUTORESEARCH_ALLOW_INSTALL="1")).stdout
    assert allowed == ""


def test_the_command_line_of_each_agent_cli(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import proposers

    options = {"max_turns": 7, "agent_bin": "/bin/claude", "allow_install": False, "agent_args": "--model sonnet"}
    prompt_file = tmp_path / "p.md"
    assert proposers.agent_command("claude", "PROMPT", prompt_file, options) == (
        ["/bin/claude", "-p", "PROMPT", "--output-format", "json", "--max-turns", "7",
         "--allowedTools", "Read,Glob,Grep,Edit,Write", "--model", "sonnet"], None)
    installing = proposers.agent_command("claude", "P", prompt_file, dict(options, allow_install=True))[0]
    assert installing[installing.index("--allowedTools") + 1].endswith(",Bash(uv pip install:*),Bash(pip install:*)")
    options = dict(options, agent_bin="codex", agent_args=None)
    codex = proposers.agent_command("codex", "P", prompt_file, options)[0]
    assert codex[:2] == ["codex", "exec"] and codex[-1] == "P"
    assert "--full-auto" not in codex and "--sandbox" not in codex  # gone; and it would switch the profile off
    assert "--dangerously-bypass-hook-trust" in codex  # the project's hooks run in a headless run
    overrides = [codex[i + 1] for i, word in enumerate(codex) if word == "-c"]
    assert f'projects={{"{proposers.common.ROOT}" = {{"trust_level" = "trusted"}}}}' in overrides
    [filesystem] = [word for word in overrides if word.startswith("permissions.autoresearch.filesystem=")]
    assert '"prepare.py" = "read"' in filesystem and '"scripts" = "read"' in filesystem
    assert proposers.agent_command("opencode", "P", prompt_file, dict(options, agent_bin="opencode"))[0] == [
        "opencode", "run", "P"]
    assert proposers.agent_command("command", "P", prompt_file, dict(options, agent_command="x --in {prompt_file}")) \
        == (["x", "--in", str(prompt_file)], None)
    assert proposers.agent_command("command", "P", prompt_file, dict(options, agent_command="x -")) == (["x", "-"], "P")
    echoed = json.dumps(proposers.ANSWER_EXAMPLE)  # a CLI that prints the prompt back is not answering
    assert proposers.parse_agent_output("codex", echoed)[2].startswith("the answer has no JSON object")


def fake_cli(tmp_path, name, body):
    """An executable stand-in for an agent CLI: `body` is Python run with the loop's arguments."""
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    os.chmod(path, 0o755)
    return str(path)


def test_a_failed_agent_call_is_reported_with_the_end_of_its_stderr(repo, tmp_path):
    # as Codex 0.171 does with --full-auto: a PATH warning first, the error last
    failing = fake_cli(tmp_path, "codex", "print('WARNING: proceeding, even though we could not create PATH aliases',"
                       " file=sys.stderr)\nprint('\\n'.join(f'detail {n}' for n in range(20)), file=sys.stderr)\n"
                       "print(\"error: unexpected argument '--full-auto' found\", file=sys.stderr)\nsys.exit(2)")
    ok(with_client_rules(repo).start("--agent", "codex", "--agent-bin", failing, "--max-failures", "1"))
    record = repo.record(1)
    assert record["outcome"] == "agent_error"
    assert record["reason"].startswith("the agent exited with code 2: ")
    assert record["reason"].endswith("error: unexpected argument '--full-auto' found")
    assert "WARNING" not in record["reason"]


def test_an_empty_opencode_answer_after_a_refused_permission_says_so(repo, tmp_path):
    # opencode run with an `ask` permission: it auto-rejects, prints nothing, and exits 0
    silent = fake_cli(tmp_path, "opencode", "sys.stderr.write('\\x1b[93m\\x1b[1m! \\x1b[0mpermission requested: "
                      "external_directory (/etc/*); auto-rejecting\\n\\x1b[91mError: \\x1b[0mThe user rejected "
                      "permission to use this specific tool call.\\n')")
    ok(with_client_rules(repo).start("--agent", "opencode", "--agent-bin", silent, "--max-failures", "1"))
    reason = repo.record(1)["reason"]
    assert reason.startswith("opencode stopped at a permission it would have to ask for (permission requested: "
                             "external_directory (/etc/*); auto-rejecting)"), reason
    assert "allow or deny it in opencode.json" in reason


@pytest.mark.parametrize("agent", ["codex", "opencode"])
def test_installs_are_refused_up_front_for_clients_whose_configuration_refuses_them(repo, tmp_path, agent):
    result = with_client_rules(repo).start("--agent", agent, "--agent-bin", fake_cli(tmp_path, agent, "pass"),
                                           "--allow-install")
    assert result.returncode == 2 and not (repo.path / "runs" / "loop" / "state.json").exists()
    assert result.stderr.strip().endswith("--allow-install works with --agent claude only: "
                                          + proposers_module().NO_INSTALLS[agent] + " for the agent")
    assert len(result.stderr.strip().splitlines()) == 1


def proposers_module():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import proposers

    return proposers


@pytest.mark.parametrize("agent, rules", [("codex", ".codex/config.toml"), ("opencode", "opencode.json")])
def test_a_client_without_its_rules_in_the_repository_is_refused(repo, tmp_path, agent, rules):
    result = repo.start("--agent", agent, "--agent-bin", fake_cli(tmp_path, agent, "pass"))
    assert result.returncode == 2 and not (repo.path / "runs" / "loop" / "state.json").exists()
    assert f"{rules} is missing" in result.stderr and len(result.stderr.strip().splitlines()) == 1
