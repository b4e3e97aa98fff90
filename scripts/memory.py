"""Search the research memory: the few entries most relevant to a query, not whole files.

An overnight agent's context is its scarcest resource; reading notes.md, three memory files and
the ledger in full before every experiment would spend it on the same text again and again.
This splits them into entries and ranks the entries with BM25 (the classic search-engine score:
rare query words count more, a word repeated in one entry counts less each time, long entries
are not favoured), then prints the best few, one short paragraph each.

Entries:
- notes.md and .claude/context/memory/{learnings,issues,decisions}.md: each heading's block
  (a REASONING or ANALYSIS block, a learning, the Best Known Config); the one-line-per-item
  sections of notes.md (Dead Ends, What Works, Ideas Queue) give one entry per item, labelled
  with the section. Template comments are skipped.
- results.tsv: one entry per ledger row.

Usage:
    uv run scripts/memory.py search "QUERY" [--limit N]

Exit code: 0 when something matched, 1 when nothing did.
"""

import argparse
import math
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MEMORY_FILES = ("learnings.md", "issues.md", "decisions.md")
MAX_ENTRY_CHARS = 300  # one entry is a paragraph, never a page
BM25_K1 = 1.2  # term-frequency saturation
BM25_B = 0.75  # length normalisation
HEADING = re.compile(r"^(#{1,6})\s+(.*\S)\s*$")
LIST_ITEM = re.compile(r"^(?:[-*+]|\d+[.)])\s+")
ITEM_SECTIONS = ("Dead Ends", "What Works", "Ideas Queue")  # notes.md sections of independent one-liners
STOP_WORDS = frozenset("a an and are as at be by for from in is it of on or that the this to was with".split())


def words(text):
    """Lower-case search terms: words and numbers (0.04 stays one term), plurals folded."""
    terms = []
    for word in re.findall(r"[a-z0-9_]+(?:\.[0-9]+)?", text.lower()):
        if word in STOP_WORDS:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        terms.append(word)
    return terms


def markdown_entries(path, label):
    """(label › heading, text) for each `##`+ heading block (or item, in ITEM_SECTIONS) of a markdown file."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    text = common.strip_comments(text)
    entries, heading, block = [], "", []

    def flush():
        lines = [line.strip() for line in block if line.strip()]
        where = f"{label} › {heading}"
        if not heading:  # the title and preamble: instructions for the file, not memory
            lines = []
        if heading.startswith(ITEM_SECTIONS):
            current = []
            for line in lines:  # an item runs until the next item
                if LIST_ITEM.match(line) and current:
                    entries.append((where, " ".join(current)))
                    current = []
                current.append(line)
            if current:
                entries.append((where, " ".join(current)))
        elif lines:
            entries.append((where, " ".join(lines)))
        block.clear()

    for line in text.splitlines():
        match = HEADING.match(line)
        if match:
            flush()
            heading = match.group(2) if len(match.group(1)) > 1 else ""
        else:
            block.append(line)
    flush()
    return entries


def ledger_entries(path):
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    return [(path.name, " ".join(line.split("\t"))) for line in lines[1:] if line.strip()]


def all_entries():
    entries = markdown_entries(common.NOTES_FILE, "notes.md")
    for name in MEMORY_FILES:
        entries += markdown_entries(common.MEMORY_DIR / name, f"memory/{name}")
    return entries + ledger_entries(common.LEDGER_FILE)


def rank(entries, query):
    """Entries scored by BM25 against `query`, best first; entries sharing no term are left out."""
    documents = [words(f"{where} {text}") for where, text in entries]
    if not documents:
        return []
    average_length = sum(map(len, documents)) / len(documents)
    frequency = Counter(term for document in documents for term in set(document))
    terms = set(words(query))
    scored = []
    for entry, document in zip(entries, documents):
        counts, score = Counter(document), 0.0
        for term in terms & counts.keys():
            idf = math.log(1 + (len(documents) - frequency[term] + 0.5) / (frequency[term] + 0.5))
            norm = BM25_K1 * (1 - BM25_B + BM25_B * len(document) / average_length)
            score += idf * counts[term] * (BM25_K1 + 1) / (counts[term] + norm)
        if score > 0:
            scored.append((score, entry))
    scored.sort(key=lambda pair: -pair[0])
    return [entry for _, entry in scored]


def shorten(text):
    text = " ".join(text.split())
    return text if len(text) <= MAX_ENTRY_CHARS else text[: MAX_ENTRY_CHARS - 3] + "..."


def main():
    parser = argparse.ArgumentParser(description="Search notes.md, the memory files and the ledger.")
    commands = parser.add_subparsers(dest="command", required=True)
    search = commands.add_parser("search", help="print the entries most relevant to QUERY")
    search.add_argument("query", help="a few words, e.g. 'learning rate warmdown'")
    search.add_argument("--limit", type=int, default=5, help="how many entries to print (default: 5)")
    args = parser.parse_args()
    if args.limit < 1:
        parser.error("--limit must be at least 1")
    found = rank(all_entries(), args.query)[: args.limit]
    if not found:
        print(f"no entries match {args.query!r} (searched notes.md, .claude/context/memory/*.md, results.tsv)")
        return 1
    for where, text in found:
        print(f"{where}: {shorten(text)}")
    return 0


if __name__ == "__main__":
    common.run_main(main)
