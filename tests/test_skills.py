"""The skill pack against the Agent Skills rules, and the docs against the code.

Every `uv run scripts/NAME.py ...` that program.md, the skills, the slash commands, AGENTS.md,
CLAUDE.md or a hook message tells the agent to run must name a script that exists and whose
argument parser accepts those arguments. The script runs for real, stopped right after parsing.
"""

import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SKILLS = REPO / "skills"
SKILL_DIRS = sorted(path.parent for path in SKILLS.glob("*/SKILL.md"))
KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def frontmatter(path):
    """The `key: value` lines between the opening `---` lines of a markdown file."""
    text = path.read_text()
    assert text.startswith("---\n"), f"{path} has no frontmatter"
    block = text[4:text.index("\n---\n", 4)]
    return dict(line.split(":", 1) for line in block.splitlines() if ":" in line and not line.startswith(" "))


def test_both_skills_exist():
    assert [path.name for path in SKILL_DIRS] == ["ml-experiment-loop", "research-report"]


@pytest.mark.parametrize("skill", SKILL_DIRS, ids=lambda path: path.name)
def test_skill_follows_agent_skills_rules(skill):
    meta = {key.strip(): value.strip() for key, value in frontmatter(skill / "SKILL.md").items()}
    assert meta["name"] == skill.name
    assert KEBAB.match(meta["name"]) and len(meta["name"]) <= 64
    assert 0 < len(meta["description"]) <= 1024
    assert "Use when" in meta["description"]  # says when to use it, not only what it does
    assert len((skill / "SKILL.md").read_text().splitlines()) < 500


@pytest.mark.parametrize("skill", SKILL_DIRS, ids=lambda path: path.name)
def test_skill_links_point_at_sibling_files(skill):
    text = re.sub(r"```.*?```", "", (skill / "SKILL.md").read_text(), flags=re.S)  # examples are not links
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert (skill / target).exists(), f"{skill.name}/SKILL.md links to missing {target}"


def test_project_skills_are_the_same_files_not_a_copy():
    link = REPO / ".claude" / "skills"
    assert link.is_symlink() and not Path(link.readlink()).is_absolute()  # works in any clone
    assert link.resolve() == SKILLS.resolve()


def test_memory_templates_have_the_sections_the_hooks_and_skill_read():
    notes = (SKILLS / "ml-experiment-loop" / "templates" / "notes.md").read_text()
    for section in ("## Best Known Config", "## Dead Ends", "## What Works", "## Ideas Queue (ranked)", "## Experiment Log"):
        assert section in notes
    fields = ("### REASONING", "hypothesis:", "evidence:", "risk:", "### ANALYSIS", "result:", "vs expected:", "why:", "lesson:")
    for field in fields:
        assert field in notes
    for name in ("learnings.md", "issues.md", "decisions.md"):
        assert (SKILLS / "ml-experiment-loop" / "templates" / name).read_text().startswith("# ")


def test_commands_have_descriptions():
    commands = sorted((REPO / ".claude" / "commands").glob("*.md"))
    assert [path.stem for path in commands] == ["experiment", "report", "status"]
    for path in commands:
        assert frontmatter(path)["description"].strip()


def test_plugin_manifest_points_at_the_skill_pack():
    manifest = json.loads((REPO / ".claude-plugin" / "plugin.json").read_text())
    assert KEBAB.match(manifest["name"])
    assert (REPO / manifest["skills"]).resolve() == SKILLS.resolve()
    assert (REPO / manifest["commands"]).is_dir()


def test_settings_hooks_run_existing_scripts_from_the_project_dir():
    settings = json.loads((REPO / ".claude" / "settings.json").read_text())
    commands = [hook["command"] for groups in settings["hooks"].values() for group in groups for hook in group["hooks"]]
    assert len(commands) == 4
    for command in commands:
        match = re.fullmatch(r'python3 "\$\{CLAUDE_PROJECT_DIR:-\.\}/(\.claude/hooks/[\w]+\.py)"', command)
        assert match, command
        script = REPO / match.group(1)
        header = script.read_text().split('"""')[1]
        assert "Why" in header or "why" in header.lower(), f"{script.name} header does not say why"


# ---------------------------------------------------------------------------------------------
# Docs against code

DOC_FILES = sorted(
    [REPO / "program.md", REPO / "AGENTS.md", REPO / "CLAUDE.md"]
    + list(SKILLS.rglob("*.md"))
    + list((REPO / ".claude" / "commands").glob("*.md"))
    + list((REPO / ".claude" / "hooks").glob("*.py"))
)
COMMAND = re.compile(r"uv run (scripts/[\w-]+\.py)([^`\n]*)")
PLACEHOLDERS = {  # what the docs write in capitals or angle brackets -> a value of the right kind
    "TAG": "nov23", "HOURS": "8", "ISO-TIME": "2999-01-01T07:00", "N": "10", "COMMIT": "abc1234",
    "QUERY": "learning rate", "TOPIC": "warmdown", "DESCRIPTION": "lr 0.05", "SHORT DESCRIPTION": "lr 0.05",
    "WHY": "plateau", "TEXT": "plateau", "SECONDS": "600", "CMD": "python3 train.py",
}

PARSE_ONLY = """
import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_and_stop(self, args=None, namespace=None):
    parse(self, args, namespace)  # a bad argument exits 2 here, with argparse's message
    print("ARGUMENTS ACCEPTED")
    sys.exit(0)
argparse.ArgumentParser.parse_args = parse_and_stop
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def variants(arguments):
    """Concrete argument lists for one documented command line (alternatives a|b expanded)."""
    arguments = arguments.replace('\\"', '"')  # quotes escaped inside a Python string (hook messages)
    arguments = re.sub(r"\s+#.*$", "", arguments).strip().rstrip(".,;:")
    arguments = re.sub(r"<[^>]+>", "placeholder", arguments)
    for name in sorted(PLACEHOLDERS, key=len, reverse=True):
        arguments = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", PLACEHOLDERS[name], arguments)
    arguments = arguments.replace("[", " ").replace("]", " ")
    choices = [word.split("|") if "|" in word and not word.startswith(("'", '"')) else [word]
               for word in shlex.split(arguments)]
    return [list(combination) for combination in itertools.product(*choices)]


def documented_commands():
    """{(script, argv): [docs that say it]} for every documented helper command line."""
    found = {}
    for path in DOC_FILES:
        for script, arguments in COMMAND.findall(path.read_text()):
            for argv in variants(arguments):
                found.setdefault((script, tuple(argv)), []).append(path.relative_to(REPO).as_posix())
    return found


DOCUMENTED = documented_commands()


def test_docs_name_every_helper():
    scripts = {script for script, _ in DOCUMENTED}
    for name in ("setup", "experiment", "decide", "status", "plot", "memory"):
        assert f"scripts/{name}.py" in scripts


@pytest.mark.parametrize("script,argv", sorted(DOCUMENTED), ids=[f"{s} {' '.join(a)}" for s, a in sorted(DOCUMENTED)])
def test_documented_command_exists_and_accepts_its_arguments(script, argv):
    docs = ", ".join(sorted(set(DOCUMENTED[script, argv])))
    assert (REPO / script).exists(), f"{docs} tell the agent to run {script}, which does not exist"
    result = subprocess.run([sys.executable, "-c", PARSE_ONLY, str(REPO / script), *argv],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0 and "ARGUMENTS ACCEPTED" in result.stdout, (
        f"{docs}: `uv run {script} {' '.join(argv)}` is rejected: {result.stderr.strip()[-300:]}"
    )
