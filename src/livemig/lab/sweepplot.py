"""The convergence sweep's plot: what happened beside what was predicted.

One row of panels per metric (total time, downtime, bytes sent / memory),
one column per link; in each panel one colour per mode against the measured
dirty rate:

- the measured medians as a solid line, with bars from the smallest to the
  largest repeat over the runs each median is taken from (the spread);
- the prediction for the row's mode (sweep.prediction) as a dashed line with
  hollow markers in the same colour;
- a red × where some repeat gave up without converging (pre-copy's
  limits), a black ▲ where some repeat failed with an error: a failure is a
  bug or a broken link, "not converged" is the model's expected outcome;
- a grey dashed line at the link's bandwidth when it is inside the axis.

The panels of a row share one y-scale, so the links compare at a glance.

Beside it, ``plot_rounds`` draws convergence itself for one point (one
link, memory, workload and dirty rate, every mode measured there): the dirty
set left at the end of each pre-copy round, from the migrations' own round
records (``stats.rounds``), starting from the whole memory before round 0; a
post-copy or hybrid line ends where it switched over, with the pages still
owed then. The point chosen is the one where pre-copy needed the most rounds.
"""
from __future__ import annotations

import math

from ..units import MIB, PAGE_SIZE
from .sweepreport import group

METRICS = (
    ("total time (s)", "total_time_s", "predicted_total_time_s"),
    ("downtime (ms)", "downtime_ms", "predicted_downtime_ms"),
    ("bytes sent / memory", "bytes_per_memory", "predicted_bytes_per_memory"),
)
"""(axis label, measured row field, predicted row field), one row of panels each."""


def _measured(row: dict, field: str):
    if field == "total_time_s" and not row["converged"]:
        return row["giveup_time_s"]
    return row[field]


def _x(row: dict) -> float:
    m = row.get("measured_dirty_rate_bps")
    if m is not None:
        return m / MIB
    return (row.get("dirty_rate_bps") or 0) / MIB


def _nan(y):
    return math.nan if y is None else y


def _panel(ax, sub: list[dict], modes: list[str], colours: dict, measured: str,
           predicted: str) -> None:
    for mode in modes:
        pts = sorted((r for r in sub if r["mode"] == mode), key=_x)
        if not pts:
            continue
        xs = [_x(r) for r in pts]
        ys = [_nan(_measured(r, measured)) for r in pts]
        spreads = [r["spread"][measured] for r in pts]
        low = [0.0 if s is None or math.isnan(y) else y - s[0] for y, s in zip(ys, spreads)]
        high = [0.0 if s is None or math.isnan(y) else s[1] - y for y, s in zip(ys, spreads)]
        ax.errorbar(xs, ys, yerr=[low, high], fmt="o-", color=colours[mode], label=mode,
                    markersize=4, capsize=3)
        ax.plot(xs, [_nan(r[predicted]) for r in pts], "o--", color=colours[mode],
                markerfacecolor="none", markersize=5, alpha=0.7,
                label=f"{mode} predicted")
        for count, marker, colour, label in (("not_converged", "x", "red", "not converged"),
                                              ("failed", "^", "black", "failed")):
            hit = [(x, 0.0 if math.isnan(y) else y) for x, y, r in zip(xs, ys, pts) if r[count]]
            if hit:
                ax.scatter(*zip(*hit), marker=marker, s=70, color=colour, zorder=5, label=label)


def figure(result: dict):
    """The matplotlib Figure for ``result``, None when no point was measured."""
    import matplotlib.pyplot as plt

    rows = [r for r in group(result["points"]) if r["status"] == "measured"]
    if not rows:
        return None
    links = list(dict.fromkeys(r["link"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    colours = dict(zip(modes, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    max_rate = max((_x(r) for r in rows), default=1.0)
    fig, axes = plt.subplots(len(METRICS), len(links), figsize=(4.5 * len(links), 9),
                             squeeze=False, sharey="row")
    for col, link in enumerate(links):
        sub = [r for r in rows if r["link"] == link]
        bw_bit = sub[0]["link_bit_s"]
        for row_i, (label, measured, predicted) in enumerate(METRICS):
            ax = axes[row_i][col]
            _panel(ax, sub, modes, colours, measured, predicted)
            if bw_bit and bw_bit / 8 / MIB <= 1.5 * max_rate:
                ax.axvline(bw_bit / 8 / MIB, color="grey", linestyle="--",
                           label="link bandwidth")
            ax.set_xlabel("dirty rate (MiB/s, measured)")
            ax.set_ylabel(label)
            if row_i == 0:
                bw_txt = "" if not bw_bit else f" = {bw_bit / 8 / MIB:,.0f} MiB/s"
                ax.set_title(f"link {link}{bw_txt}")
            ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center",
               ncol=min(len(handles), 6))
    meta = result["meta"]
    missing = sorted(meta.get("unsupported_modes") or ())
    fig.suptitle(f"livemig convergence ({meta['profile']['name']}, {meta['link_method']}); "
                 "bars: spread over repeats; dashed: predicted; red ×: not converged; "
                 "black ▲: failed"
                 + (f"; not supported by this engine: {', '.join(missing)}" if missing else ""),
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    return fig


def _save(make, result: dict, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); install the 'plot' extra"
    fig = make(result)
    if fig is None:
        return "no measured point to plot"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def rounds_point(result: dict) -> list[dict] | None:
    """The completed points (one per mode: its first repeat) of the sweep
    point whose pre-copy needed the most rounds (ties: more modes, then the
    higher dirty rate); None if nothing completed."""
    done = [p for p in result["points"] if p["status"] == "completed" and p.get("stats")]
    if not done:
        return None

    def key(p):
        return (p["link"], p["memory"], p["workload"], p["dirty_rate"])

    def rank(k):
        # most pre-copy rounds, then most modes, then the highest dirty rate
        # (unpaced counts as the highest): the point where convergence shows
        same = [p for p in done if key(p) == k]
        rate = same[0].get("dirty_rate_bps")
        return (max(len(p["stats"]["rounds"]) for p in same if p["mode"] == "precopy")
                if any(p["mode"] == "precopy" for p in same) else 0,
                len({p["mode"] for p in same}), math.inf if rate is None else rate)

    best = max(dict.fromkeys(key(p) for p in done), key=rank)
    chosen: dict[str, dict] = {}
    for p in done:
        if key(p) == best:
            chosen.setdefault(p["mode"], p)
    return list(chosen.values())


def rounds_figure(result: dict):
    """Remaining dirty set per round, per mode, for ``rounds_point``; None if none."""
    import matplotlib.pyplot as plt

    pts = rounds_point(result)
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in pts:
        s = p["stats"]
        ys = [s["memory_bytes"] / MIB] + [r["dirty_pages"] * PAGE_SIZE / MIB
                                           for r in s["rounds"]]
        xs = list(range(len(ys)))
        line, = ax.plot(xs, ys, "o-", label=f"{p['mode']} ({s['downtime_ms'] or 0:.0f} ms "
                        "downtime)")
        owed = (s.get("postcopy") or {}).get("duration_ms")
        if owed:
            ax.scatter([xs[-1]], [ys[-1]], marker="s", s=80, color=line.get_color(),
                       zorder=5)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("pre-copy rounds done (0: all of memory still to send)")
    ax.set_ylabel("dirty set left (MiB)")
    p0 = pts[0]
    ax.set_title(f"convergence: {p0['workload']} {p0['memory']} at {p0['dirty_rate']}, "
                 f"link {p0['link']}\n(■ switch to post-copy: pages still owed)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(result: dict, path: str) -> str | None:
    """Write the PNG; None on success, else why it was skipped."""
    return _save(figure, result, path)


def plot_rounds(result: dict, path: str) -> str | None:
    """Write the per-round convergence PNG; None on success, else why not."""
    return _save(rounds_figure, result, path)


__all__ = ["figure", "plot", "rounds_figure", "rounds_point", "plot_rounds"]
