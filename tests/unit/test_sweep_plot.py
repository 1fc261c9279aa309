"""The convergence plot on a small synthetic result: failures apart from
give-ups, predictions beside measurements, spread over repeats, one y-scale
per row of panels."""
import pytest

from livemig.units import MIB

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    pytest.skip("matplotlib is not installed (the 'plot' extra)", allow_module_level=True)

from livemig.lab.sweepplot import figure, plot  # noqa: E402


def _run(mode, link, rate_mib, repeat, outcome, total_s, downtime_ms=None):
    converged = outcome == "completed"
    return {
        "mode": mode, "sweep_workload": "uniform", "memory": "64MiB", "link": link,
        "link_bit_s": {"800Mbit": 800e6, "200Mbit": 200e6}[link],
        "dirty_rate": f"{rate_mib}MiB/s", "dirty_rate_bps": rate_mib * MIB, "repeat": repeat,
        "status": "completed" if converged else "failed",
        "error": None if converged else "did not converge" if outcome == "not-converged"
        else "connection reset",
        "summary": {"converged": converged, "outcome": outcome, "total_time_s": total_s,
                    "downtime_ms": downtime_ms, "bytes_per_memory": 1.2 + repeat / 10,
                    "rounds": 3, "throttle_pct": 0, "measured_dirty_rate_bps": rate_mib * MIB,
                    "measured_bandwidth_bps": 90 * MIB, "predicted_outcome": "converges",
                    "predicted_rounds": 3, "predicted_downtime_ms": 20.0,
                    "predicted_total_time_s": 1.0, "predicted_bytes_per_memory": 1.1}}


def _result():
    points = [
        # precopy at 800Mbit: two repeats that converge with a spread of total times
        _run("precopy", "800Mbit", 8, 0, "completed", 1.0, 10.0),
        _run("precopy", "800Mbit", 8, 1, "completed", 2.0, 30.0),
        # precopy at 200Mbit: one gave up, one failed with an error
        _run("precopy", "200Mbit", 64, 0, "not-converged", 30.0),
        _run("precopy", "200Mbit", 64, 1, "failed", None),
        _run("postcopy", "800Mbit", 8, 0, "completed", 0.8, 5.0),
        _run("postcopy", "200Mbit", 64, 0, "completed", 3.0, 5.0),
    ]
    meta = {"profile": {"name": "synthetic"}, "link_method": "ratelimit"}
    return {"meta": meta, "points": points}


@pytest.fixture
def fig():
    f = figure(_result())
    yield f
    plt.close(f)


def _labels(fig):
    return {t.get_text() for legend in fig.legends for t in legend.get_texts()}


def test_failed_runs_are_marked_apart_from_not_converged(fig):
    labels = _labels(fig)
    assert {"failed", "not converged"} <= labels
    top_right = fig.axes[1]                    # total time, 200Mbit
    markers = {c.get_label() for c in top_right.collections}
    assert {"failed", "not converged"} <= markers


def test_predictions_are_drawn_beside_the_measured_points(fig):
    assert {"precopy", "precopy predicted", "postcopy", "postcopy predicted"} <= _labels(fig)
    top_left = fig.axes[0]
    predicted = [line for line in top_left.get_lines() if line.get_label() == "precopy predicted"]
    assert predicted and list(predicted[0].get_ydata()) == [1.0]


def test_spread_over_repeats_is_drawn_as_bars(fig):
    top_left = fig.axes[0]                     # total time, 800Mbit: repeats 1.0 and 2.0 s
    bars = [c for c in top_left.containers if c.get_label() == "precopy"]
    assert bars and bars[0].has_yerr
    segments = bars[0].lines[2][0].get_segments()
    assert [(s[0][1], s[1][1]) for s in segments] == [(1.0, 2.0)]


def test_each_row_of_panels_shares_one_y_scale(fig):
    axes = fig.axes[:6]
    for row in range(3):
        left, right = axes[2 * row], axes[2 * row + 1]
        assert left.get_shared_y_axes().joined(left, right)
        assert left.get_ylim() == right.get_ylim()
    assert not axes[0].get_shared_y_axes().joined(axes[0], axes[2])   # time vs downtime


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "c.png"
    assert plot(_result(), str(path)) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
