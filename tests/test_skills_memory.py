"""scripts/memory.py: the memory search the loop skill tells the agent to use, run as a real process
in a temporary copy of the project (its paths come from scripts/common.py, next to it)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "skills" / "ml-experiment-loop" / "templates"

NOTES_LOG = """
### REASONING: warmdown 0.6
- hypothesis: a longer warmdown lowers the final loss
- evidence: loss still falling when training ends
- risk: none

### ANALYSIS: warmdown 0.6
- result: val_bpb 0.9871 (best 0.9911, delta -0.004), keep
- lesson: warmdown matters at this budget
"""


@pytest.fixture
def project(tmp_path):
    (tmp_path / "scripts").mkdir()
    for name in ("memory.py", "common.py"):
        shutil.copy(REPO / "scripts" / name, tmp_path / "scripts" / name)
    notes = (TEMPLATES / "notes.md").read_text()
    notes = notes.replace("## Dead Ends\n", "## Dead Ends\n\n- 2x learning rate (0.04 -> 0.08): +0.012 val_bpb, loss spikes\n"
                          "- SwiGLU activation: slower steps ate the budget\n")
    (tmp_path / "notes.md").write_text(notes + NOTES_LOG)
    memory = tmp_path / ".claude" / "context" / "memory"
    memory.mkdir(parents=True)
    for name in ("learnings.md", "issues.md", "decisions.md"):
        shutil.copy(TEMPLATES / name, memory / name)
    with open(memory / "issues.md", "a") as handle:
        handle.write("\n## Out of memory at depth 16\n- symptom: torch.OutOfMemoryError\n- workaround: halve DEVICE_BATCH_SIZE\n")
    (tmp_path / "results.tsv").write_text(
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
        "abc1234\t0.991100\t44.0\tkeep\tbaseline\n"
        "def5678\t0.000000\t0.0\tcrash\tdepth 16 out of memory\n"
    )
    return tmp_path


def search(project, *args):
    result = subprocess.run([sys.executable, str(project / "scripts" / "memory.py"), "search", *args],
                            capture_output=True, text=True, timeout=30)
    return result.returncode, result.stdout.splitlines()


def test_best_entry_first(project):
    code, lines = search(project, "learning rate")
    assert code == 0
    assert lines[0].startswith("notes.md › Dead Ends: - 2x learning rate")


def test_searches_memory_files_and_ledger(project):
    code, lines = search(project, "out of memory depth 16")
    assert code == 0
    assert any(line.startswith("memory/issues.md › Out of memory at depth 16") for line in lines[:2])
    assert any(line.startswith("results.tsv: def5678") for line in lines[:2])


def test_log_blocks_are_whole_entries(project):
    _, lines = search(project, "warmdown", "--limit", "2")
    assert len(lines) == 2
    assert all("warmdown 0.6" in line for line in lines)
    assert any("lesson: warmdown matters" in line for line in lines)


def test_template_guidance_is_not_memory(project):
    code, lines = search(project, "newest last heading")
    assert code == 1 and lines[0].startswith("no entries match")


def test_output_stays_small(project):
    _, lines = search(project, "val_bpb loss budget commit")
    assert len(lines) <= 5 and all(len(line) < 400 for line in lines)


def test_limit_must_be_positive(project):
    code, _ = search(project, "x", "--limit", "0")
    assert code == 2
