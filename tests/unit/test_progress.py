"""What operators see, as pure functions: progress, history rows, the
progress view, metrics text."""
import io

from livemig.service.display import ProgressView, bar, progress_fields
from livemig.service.history import History, history_entry
from livemig.service.metrics import render
from livemig.stats import MigrationStats, RoundRecord, progress

MIB = 1 << 20


def test_round_zero_progress_has_every_field_but_the_dirty_rate():
    stats = MigrationStats(status="active", memory_bytes=64 * MIB, remaining_bytes=48 * MIB,
                           bytes_sent=16 * MIB)
    p = progress(stats, elapsed_s=2.0)
    assert p["round"] == 0 and p["percent"] == 25.0
    assert p["throughput_bps"] == 8 * MIB and p["eta_s"] == 6.0
    assert p["dirty_rate_bps"] is None and p["owed_pages"] is None


def test_later_rounds_report_the_dirty_rate_of_the_last_round():
    stats = MigrationStats(status="active", memory_bytes=64 * MIB, remaining_bytes=MIB,
                           bytes_sent=70 * MIB, expected_downtime_ms=40.0)
    stats.add_round(RoundRecord(0, 2.0, 16384, 64 * MIB, 512))
    p = progress(stats, elapsed_s=3.0)
    assert p["round"] == 1 and p["dirty_rate_bps"] == 512 * 4096 / 2.0
    assert p["expected_downtime_ms"] == 40.0


def test_postcopy_progress_drops_the_expected_downtime_and_counts_faults():
    stats = MigrationStats(status="postcopy-active", memory_bytes=64 * MIB,
                           remaining_bytes=100 * 4096, bytes_sent=60 * MIB,
                           expected_downtime_ms=900.0, postcopy_started_ms=1000.0,
                           pages_requested=50)
    p = progress(stats, elapsed_s=3.0)
    assert p["expected_downtime_ms"] is None and p["round"] is None
    assert p["owed_pages"] == 100 and p["fault_rate_pps"] == 25.0


def test_history_rows_say_null_where_a_field_does_not_apply(tmp_path):
    described = {"id": 3, "vm": "web", "direction": "outgoing", "peer": "10.0.0.2:7400",
                 "status": "completed", "error": None,
                 "stats": {"mode": "hybrid", "nrounds": 4, "converged": False,
                           "total_time_ms": 10.0}}
    row = history_entry(described, host="10.0.0.1:7400", started_wall_s=0.0)
    assert row["converged"] is None and row["rounds"] == 4
    incoming = history_entry({**described, "direction": "incoming",
                              "stats": {"mode": "precopy", "nrounds": 0, "converged": False}},
                             host="10.0.0.2:7400", started_wall_s=0.0)
    assert incoming["converged"] is None and incoming["rounds"] is None
    history = History(str(tmp_path / "h.jsonl"))
    history.append(row)
    with open(history.path, "a") as f:
        f.write('{"torn')             # a daemon killed mid-write
    assert History(history.path).read() == [row]


def test_the_view_draws_a_bar_on_a_terminal_and_lines_in_a_pipe():
    rec = {"id": 1, "vm": "web", "status": "active",
           "progress": {"round": 0, "transferred_bytes": MIB, "remaining_bytes": 3 * MIB,
                        "percent": 25.0, "throughput_bps": MIB, "elapsed_s": 1.0,
                        "eta_s": 3.0, "dirty_rate_bps": None}}
    assert bar(25.0).startswith("[######......") and "25%" in bar(25.0)
    assert "dirty" not in " ".join(progress_fields(rec))
    tty = io.StringIO()
    view = ProgressView(tty, tty=True)
    view.show([rec])
    view.show([rec])
    assert tty.getvalue().count("\x1b[1F") == 1 and tty.getvalue().count("web #1") == 2
    clock = iter([0.0, 0.5, 1.5])
    pipe = io.StringIO()
    view = ProgressView(pipe, tty=False, now=lambda: next(clock))
    for _ in range(3):
        view.show([rec])
    assert pipe.getvalue().count("\n") == 2 and "\x1b" not in pipe.getvalue()


def test_metrics_text():
    text = render([{"name": "web"}], [
        {"id": 1, "vm": "web", "direction": "outgoing", "status": "active",
         "progress": {"transferred_bytes": 5, "remaining_bytes": 7}},
        {"id": 2, "vm": 'we"b', "direction": "incoming", "status": "completed"}])
    assert "livemig_vms 1" in text
    assert 'livemig_migrations{direction="outgoing",status="active"} 1' in text
    assert 'livemig_migration_remaining_bytes{id="1",vm="web",direction="outgoing"} 7' in text
    assert text.endswith("\n")
