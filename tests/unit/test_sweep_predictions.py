"""The sweep predicts each row with a model of its mode, and plan speaks MiB/s."""
from livemig.analysis.plan import format_plan
from livemig.lab.sweep import prediction, predicted_outcome
from livemig.lab.sweepreport import markdown_table
from livemig.policy import SWITCHOVER_COST_MS, predict
from livemig.units import MIB

BW = 100 * MIB
MEMORY = 256 * MIB


def _plan(rate_bps):
    return {"memory_bytes": MEMORY, "downtime_ms": 50.0, "bandwidth_bps": BW,
            "dirty_rate": {"bytes_per_s": rate_bps, "mib_per_s": rate_bps / MIB,
                           "method": "tracker", "window_s": 1.0},
            "probe": {"bytes_per_s": 1.5e9, "bytes": 64 * MIB, "duration_s": 0.05,
                      "rtt_ms": 0.1, "rate_limit_bps": BW},
            "prediction": predict(BW, rate_bps, MEMORY, 50.0).to_dict()}


def _point(mode, rate_bps):
    return {"mode": mode, "plan": _plan(rate_bps), "sweep_workload": "uniform",
            "memory": "256MiB", "link": "800Mbit", "dirty_rate": "200MiB/s", "repeat": 0,
            "status": "completed", "error": None, "stats": None}


def test_precopy_rows_keep_plans_prediction():
    point = _point("precopy", 200 * MIB)
    assert prediction(point) == point["plan"]["prediction"]
    assert predicted_outcome(point, prediction(point)) == "no"


def test_postcopy_rows_use_the_postcopy_model():
    point = _point("postcopy", 200 * MIB)
    p = prediction(point)
    assert p["rounds"] == 0 and p["expected_downtime_ms"] == SWITCHOVER_COST_MS
    assert p["total_time_s"] is not None              # finite: post-copy completes
    assert predicted_outcome(point, p) == "post-copy"


def test_hybrid_rows_use_the_hybrid_model():
    point = _point("hybrid", 200 * MIB)
    p = prediction(point)
    assert p["expected_downtime_ms"] == SWITCHOVER_COST_MS and p["rounds"] == 3
    assert predicted_outcome(point, p) == "post-copy"


def test_a_row_without_a_measured_bandwidth_has_no_prediction():
    point = _point("postcopy", 0)
    point["plan"]["bandwidth_bps"] = None
    assert prediction(point) == {} and predicted_outcome(point, {}) is None


def test_the_table_shows_the_postcopy_prediction():
    from livemig.lab.sweep import _summarise

    points = [_point("postcopy", 200 * MIB)]
    points[0]["summary"] = _summarise(points[0])
    meta = {"profile": {"name": "tiny", "downtime_ms": 50, "max_total_s": 30, "repeats": 1},
            "link_method": "ratelimit", "link_reason": "test", "tls": False,
            "host": {"kernel": "test", "cpus": 2}}
    row = [line for line in markdown_table({"meta": meta, "points": points}).splitlines()
           if line.startswith("| uniform")][0]
    assert "| post-copy | 0 |" in row and f"| {SWITCHOVER_COST_MS:.1f} |" in row


def test_plan_prints_every_rate_in_mib_per_s():
    text = format_plan(_plan(200 * MIB))
    assert "1,430.5 MiB/s measured" in text and "capped at 100.0 MiB/s" in text
    assert "dirty rate: 200.0 MiB/s" in text and "200.0 MiB/s ≥ bandwidth 100.0 MiB/s" in text
    assert " B/s" not in text and "GiB/s" not in text and "e+" not in text
