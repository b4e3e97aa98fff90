"""benchmarks/seed_pairing.py's one piece of logic: a change lands in train.py's cpu block, where the
cpu profile reads it last, and nowhere else."""

import re
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import seed_pairing  # noqa: E402


def cpu_block(source):
    start = source.index(seed_pairing.CPU_BLOCK)
    return source[start:source.index("\n\n", start)]


def test_a_change_replaces_the_cpu_block_s_own_line_or_ends_the_block():
    source = (ROOT / "train.py").read_text()
    replaced = seed_pairing.with_change(source, "EMBEDDING_LR=0.6")
    assert "    EMBEDDING_LR = 0.6" in cpu_block(replaced) and "EMBEDDING_LR = 0.3" not in replaced
    assert re.search(r"^EMBEDDING_LR = 0\.6 ", source, re.MULTILINE)  # the GPU default, kept as it was
    assert len(replaced.splitlines()) == len(source.splitlines())
    added = seed_pairing.with_change(source, "WARMDOWN_RATIO=0.3")
    assert cpu_block(added).splitlines()[-1] == "    WARMDOWN_RATIO = 0.3"
    assert added.replace("    WARMDOWN_RATIO = 0.3\n", "", 1) == source
