"""The per-round convergence picture picks one sweep point and draws each
mode's remaining dirty set from the round records the migrations kept."""
import pytest

from livemig.lab.sweepplot import rounds_figure, rounds_point


def _point(mode, rounds, *, rate="64 MiB/s", status="completed"):
    bps = float(rate.split()[0]) * 2**20
    return {"mode": mode, "link": "unlimited", "memory": "32MiB", "workload": "uniform",
            "dirty_rate": rate, "dirty_rate_bps": bps, "status": status,
            "stats": {"memory_bytes": 32 << 20, "downtime_ms": 5.0,
                      "rounds": [{"dirty_pages": d} for d in rounds],
                      "postcopy": {"duration_ms": 10.0 if mode != "precopy" else None}}}


def test_the_point_with_most_precopy_rounds_is_chosen_one_per_mode():
    result = {"points": [
        _point("precopy", [10], rate="8 MiB/s"),
        _point("precopy", [900, 300, 120, 40]),
        _point("precopy", [800, 200]),           # a second repeat: the first one is drawn
        _point("hybrid", [900, 300]),
        _point("postcopy", []),
        _point("postcopy", [5], status="failed"),
    ]}
    pts = rounds_point(result)
    assert [p["mode"] for p in pts] == ["precopy", "hybrid", "postcopy"]
    assert len(pts[0]["stats"]["rounds"]) == 4
    assert rounds_point({"points": [_point("precopy", [1], status="failed")]}) is None
    # as many rounds: the higher dirty rate shows more
    tie = rounds_point({"points": [_point("precopy", [0, 0], rate="0 MiB/s"),
                                   _point("precopy", [9, 3], rate="8 MiB/s")]})
    assert tie[0]["dirty_rate"] == "8 MiB/s"


def test_the_figure_draws_one_line_per_mode_from_the_rounds():
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = rounds_figure({"points": [_point("precopy", [900, 300, 40]),
                                    _point("postcopy", [])]})
    lines = fig.axes[0].get_lines()
    assert [list(line.get_ydata()) for line in lines] == [
        [32.0, 900 * 4096 / 2**20, 300 * 4096 / 2**20, 40 * 4096 / 2**20], [32.0]]
    plt.close(fig)
