"""Outputs of the convergence sweep: JSON, a Markdown table, and a plot.

The JSON keeps every run's full stats; the table groups the repeats of a
point (medians, converged count, spread) and sets a prediction beside what
happened: ``livemig plan``'s pre-copy model for pre-copy rows, the post-copy
and hybrid models (sweep.prediction) for those modes. The plot (sweepplot.py)
needs matplotlib (the ``plot`` extra); without it the JSON and the table are
still written and the plot is reported as skipped with the reason.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict

from ..units import MIB

_KEY = ("sweep_workload", "memory", "link", "mode", "dirty_rate")


def _median(values):
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def _spread(values):
    """(min, max) of the finite values, None without any: the repeats' spread."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return (min(vals), max(vals)) if vals else None


def group(points: list[dict]) -> list[dict]:
    """One row per point of the grid, repeats folded (in sweep order)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        groups[tuple(p.get(k) for k in _KEY)].append(p)
    rows = []
    for key, runs in groups.items():
        row = dict(zip(_KEY, key))
        row["runs"] = len(runs)
        row["link_bit_s"] = runs[0].get("link_bit_s")
        row["dirty_rate_bps"] = runs[0].get("dirty_rate_bps")
        if all(r["status"] == "unsupported" for r in runs):
            row["status"] = "unsupported"
            row["error"] = runs[0].get("error")
            rows.append(row)
            continue
        sums = [r.get("summary") or {} for r in runs]
        conv = [s for s in sums if s.get("converged")]
        row["status"] = "measured"
        row["converged"] = len(conv)
        row["total_time_s"] = _median(s.get("total_time_s") for s in conv)
        row["giveup_time_s"] = _median(s.get("total_time_s") for s in sums
                                       if s.get("outcome") == "not-converged")
        row["failed"] = sum(1 for s in sums if s.get("outcome") == "failed")
        row["not_converged"] = sum(1 for s in sums if s.get("outcome") == "not-converged")
        # Over the same runs as the medians: converged runs' times, else the give-ups'.
        timed = conv or [s for s in sums if s.get("outcome") == "not-converged"]
        row["spread"] = {"total_time_s": _spread(s.get("total_time_s") for s in timed),
                         "downtime_ms": _spread(s.get("downtime_ms") for s in conv),
                         "bytes_per_memory": _spread(s.get("bytes_per_memory") for s in sums)}
        row["downtime_ms"] = _median(s.get("downtime_ms") for s in conv)
        row["bytes_per_memory"] = _median(s.get("bytes_per_memory") for s in sums)
        row["bytes_sent"] = _median(s.get("bytes_sent") for s in sums)
        row["rounds"] = _median(s.get("rounds") for s in sums)
        row["throttle_pct"] = _median(s.get("throttle_pct") for s in sums)
        row["measured_dirty_rate_bps"] = _median(s.get("measured_dirty_rate_bps") for s in sums)
        row["measured_bandwidth_bps"] = _median(s.get("measured_bandwidth_bps") for s in sums)
        outcomes = [s.get("predicted_outcome") for s in sums if s.get("predicted_outcome")]
        row["predicted_outcome"] = statistics.mode(outcomes) if outcomes else None
        row["predicted_rounds"] = _median(s.get("predicted_rounds") for s in sums)
        row["predicted_downtime_ms"] = _median(s.get("predicted_downtime_ms") for s in sums)
        row["predicted_total_time_s"] = _median(s.get("predicted_total_time_s") for s in sums)
        row["predicted_bytes_per_memory"] = _median(s.get("predicted_bytes_per_memory")
                                                    for s in sums)
        errors = {r.get("error") for r in runs if r.get("error")}
        row["errors"] = sorted(errors)
        rows.append(row)
    return rows


def _f(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def markdown_table(result: dict) -> str:
    meta = result["meta"]
    prof = meta["profile"]
    lines = [f"# Convergence sweep, profile `{prof['name']}`", "",
             f"Link: **{meta['link_method']}** ({meta['link_reason']}); TLS {meta['tls']}; "
             f"downtime limit {prof['downtime_ms']:g} ms; pre-copy gives up after "
             f"{prof['max_total_s']:g} s; {prof['repeats']} run(s) per point, medians shown; "
             f"page encodings {', '.join(prof.get('encodings', []))}; "
             f"1 vCPU per VM; kernel {meta['host']['kernel']}, {meta['host']['cpus']} CPUs. "
             "Predictions use the measured bandwidth and dirty rate in a model of the row's "
             "mode: pre-copy rounds for pre-copy; for post-copy, the switchover alone as "
             "downtime and memory over bandwidth as total; for hybrid, pre-copy rounds then "
             "post-copy once the dirty set stops shrinking.", ""]
    if meta.get("unsupported_modes"):
        for mode, why in meta["unsupported_modes"].items():
            lines.append(f"- mode `{mode}` not supported by this engine: {why}")
        lines.append("")
    lines += ["| workload | memory | link | mode | dirty rate | measured | conv. | total s | "
              "downtime ms | sent/mem | rounds | throttle % | predicted | pred. rounds | "
              "pred. downtime ms | pred. total s |",
              "|" + "---|" * 16]
    for r in group(result["points"]):
        head = f"| {r['sweep_workload']} | {r['memory']} | {r['link']} | {r['mode']} | " \
               f"{r['dirty_rate']} | "
        if r["status"] == "unsupported":
            lines.append(head + "unsupported |" + " |" * 10)
            continue
        md = r["measured_dirty_rate_bps"]
        total = r["total_time_s"]
        total_text = _f(total, ".2f") if total is not None else \
            f"gave up {_f(r['giveup_time_s'], '.1f')}" if r["giveup_time_s"] is not None else "–"
        if r["failed"]:
            total_text += f" ({r['failed']} failed)"
        pred = r["predicted_outcome"] or "–"
        lines.append(
            head + f"{_f(md / MIB if md is not None else None, '.1f')} MiB/s | "
            f"{r['converged']}/{r['runs']} | {total_text} | {_f(r['downtime_ms'], '.1f')} | "
            f"{_f(r['bytes_per_memory'], '.2f')} | {_f(r['rounds'], 'g')} | "
            f"{_f(r['throttle_pct'], 'g')} | {pred} | {_f(r['predicted_rounds'], 'g')} | "
            f"{_f(r['predicted_downtime_ms'], '.1f')} | {_f(r['predicted_total_time_s'], '.2f')} |")
    failures = sorted({(r["mode"], r["link"], r["dirty_rate"], e)
                       for r in group(result["points"]) for e in r.get("errors", ())
                       if "did not converge" not in e and r["status"] != "unsupported"})
    if failures:
        lines += ["", "Runs that failed (not a convergence give-up):"]
        lines += [f"- {m}, {link}, {rate}: {e}" for m, link, rate, e in failures]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: str, stem: str) -> dict:
    """Write ``stem``.json/.md/.png (and ``stem``-rounds.png, convergence per round
    for one point) into ``out_dir``; the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, stem + ".json"),
             "markdown": os.path.join(out_dir, stem + ".md")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths["markdown"], "w") as f:
        f.write(markdown_table(result))
    from .sweepplot import plot, plot_rounds

    png = os.path.join(out_dir, stem + ".png")
    skipped = plot(result, png)
    if skipped is None:
        paths["plot"] = png
        rounds_png = os.path.join(out_dir, stem + "-rounds.png")
        if plot_rounds(result, rounds_png) is None:
            paths["rounds_plot"] = rounds_png
    else:
        result["meta"]["plot_skipped"] = skipped
        with open(paths["markdown"], "a") as f:
            f.write(f"\nPlot not drawn: {skipped}\n")
    return paths


__all__ = ["group", "markdown_table", "write_outputs"]
