"""The README stays in step with the code: CI runs its test command, its commands exist; and the
suite's own order (conftest.py's LONGEST_FIRST) names files that exist."""

import re
import subprocess
import sys

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    test_command = re.search(r"then this command\):\n\n```bash\n(.+)\n```", README).group(1)
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1].endswith(test_command)


def section(title):
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_every_prepare_option_in_the_readme_exists():
    help_text = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--help"], capture_output=True,
                               text=True, check=True).stdout
    documented = set(re.findall(r"`(--[a-z][a-z-]*)", section("Data sources") + section("Profiles") + section("On an H100")))
    assert {"--dataset", "--num-shards", "--workers", "--base-url", "--profile"} <= documented
    for option in documented:
        assert option in help_text, option


def test_readme_profiles_table_matches_prepare():
    sys.path.insert(0, str(ROOT))
    import prepare
    for name, constants in prepare.PROFILES.items():
        row = re.search(rf"^\| `{name}` \|[^|]*\| (\d+) \| ([\d,]+) (s|tokens) \| ([\d,]+) \| (\d+) \|$", README,
                        re.MULTILINE)
        assert row, name
        sequence, budget, unit, eval_tokens, vocab = row.groups()
        assert (unit == "tokens") == ("train_tokens" in constants), name  # the cpu profiles' budget is tokens
        assert [int(value.replace(",", "")) for value in (sequence, budget, eval_tokens, vocab)] == [
            constants["max_seq_len"], constants.get("train_tokens", constants["time_budget"]),
            constants["eval_tokens"], constants["vocab_size"]]


def test_the_longest_first_order_names_test_files_that_exist():
    # a renamed file would silently lose its early start (conftest.py's LONGEST_FIRST)
    from conftest import LONGEST_FIRST
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    assert [name for name in LONGEST_FIRST if not (ROOT / "tests" / name).is_file()] == []
