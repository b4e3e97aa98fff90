"""Draw progress.png from results.tsv: the picture to look at in the morning.

Every experiment is a point in the order it ran; discarded ones are faint, kept ones are joined
by the running-best step line and the new bests are labelled with their description; the
baseline is a star; crashes and invalid results are left out (they have no trusted val_bpb) but
counted in the title.
Discarded runs far above the kept ones (a diverged run) are drawn as triangles at the top edge,
so that one outlier does not squash the interesting part of the curve. For an external task
(autoresearch.toml) the axis is its metric; where higher is better the axis is turned upside down,
so that better is still down and the picture reads the same.

Usage:
    uv run scripts/plot.py [--output PATH]
"""

import argparse
import io
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

LABEL_CHARACTERS = 32


def shorten(text, limit=LABEL_CHARACTERS):
    return text if len(text) <= limit else text[:limit - 1] + "…"


def y_limits(kept, discarded, sign=1):
    """Zoom on the kept values, with room for discards up to half their span worse. sign -1 (higher
    is better): the same on the negated values, so the limits come back as (best edge, worst edge)."""
    values = [sign * row.val_bpb for row in kept + discarded]
    high = max(sign * row.val_bpb for row in (kept or discarded))
    span = max(high - min(values), abs(high) * 0.01, 1e-3)
    return sign * (min(values) - 0.05 * span), sign * (high + 0.5 * span)


def figure(rows, title_tag):
    """The picture of `rows` as a matplotlib Figure, and the number of experiments in it."""
    # Here, not at the top: a second of start-up that a refusal should not pay. A Figure of its
    # own, not pyplot's: no display on a GPU box, and no global state.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    runs = common.experiments(rows)
    position = {id(row): number for number, row in enumerate(runs, start=1)}
    kept = [row for row in runs if row.status == "keep"]
    discarded = [row for row in runs if row.status == "discard"]
    crashed = sum(row.status == "crash" for row in runs)
    invalid = sum(row.status == "invalid" for row in runs)
    fig = Figure(figsize=(12, 6), dpi=120)
    ax = fig.subplots()
    direction, metric = common.metric_direction(), common.metric_name()
    sign = -1 if direction == "higher" else 1
    if kept or discarded:
        bottom, top = y_limits(kept, discarded, sign)  # top: the worst edge (below the bottom when higher is better)
        inside = [row for row in discarded if sign * row.val_bpb <= sign * top]
        above = [row for row in discarded if sign * row.val_bpb > sign * top]
        ax.scatter([position[id(r)] for r in inside], [r.val_bpb for r in inside], s=14, color="0.55",
                   alpha=0.35, label=f"discarded ({len(inside)})")  # the ones off the top: their own entry
        if above:
            ax.scatter([position[id(r)] for r in above], [top] * len(above), marker="^", s=18, color="0.55",
                       alpha=0.35, clip_on=False, label=f"discarded, off the top ({len(above)})")
        ax.scatter([position[id(r)] for r in kept], [r.val_bpb for r in kept], s=30, color="tab:green",
                   zorder=3, label=f"kept ({len(kept)})")
        new_bests, running = [], None
        for row in kept:
            if running is None or common.beats(row.val_bpb, running, direction):
                running = row.val_bpb
                new_bests.append(row)
        if new_bests:
            xs = [position[id(r)] for r in new_bests] + [len(runs)]
            ys = [r.val_bpb for r in new_bests] + [new_bests[-1].val_bpb]
            ax.step(xs, ys, where="post", color="tab:green", linewidth=1.5, label="running best")
            for row in new_bests:
                ax.annotate(shorten(row.description), (position[id(row)], row.val_bpb), xytext=(4, 5),
                            textcoords="offset points", fontsize=7, rotation=20, color="darkgreen")
            baseline = kept[0]
            ax.scatter([position[id(baseline)]], [baseline.val_bpb], marker="*", s=180, color="tab:blue",
                       zorder=4, label=f"baseline {baseline.val_bpb:.6f}")
            ax.axhline(baseline.val_bpb, color="tab:blue", linewidth=0.8, linestyle=":", alpha=0.6)
        ax.set_ylim(bottom, top)  # with sign -1 bottom > top: matplotlib turns the axis over
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlim(0.5, max(len(runs), 1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # experiment 2, not 2.5
    ax.set_xlabel("experiment")
    external = (common.load_session() or {}).get("task") == "external"
    ax.set_ylabel(f"{metric} ({direction} is better{', self-reported' if external else ''})")
    ax.grid(alpha=0.25)
    best = common.best_ever(rows)
    best_text = f"; best {best.val_bpb:.6f}" if best else ""
    ax.set_title(f"autoresearch {title_tag}: {len(runs)} experiments, {len(kept)} kept, "
                 f"{len(discarded)} discarded, {crashed} crashed"
                 f"{f', {invalid} invalid' if invalid else ''}{best_text}")
    fig.tight_layout()
    return fig, len(runs)


def save(fig, output):
    """Writes the PNG whole or not at all: whoever opens it mid-run never sees half a picture."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    common.write_bytes_atomic(output, buffer.getvalue())


def draw(rows, title_tag, output):
    fig, count = figure(rows, title_tag)
    save(fig, output)
    return count


def main():
    parser = argparse.ArgumentParser(description="Draw progress.png from results.tsv.")
    parser.add_argument("--output", default=str(common.PROGRESS_PLOT),
                        help="where to write the picture (default: progress.png at the repository root)")
    args = parser.parse_args()
    rows = common.read_ledger()
    if not common.experiments(rows):
        raise common.Refusal("results.tsv has no experiments yet: nothing to plot")
    output = Path(args.output).resolve()
    tag = (common.load_session() or {}).get("tag") or common.current_branch() or ""
    count = draw(rows, tag, output)
    print(f"wrote {os.path.relpath(output)} ({count} experiments)")
    return 0


if __name__ == "__main__":
    common.run_main(main)
