"""The sweep's command-line face: a failed run is an exit code, not a footnote."""
from livemig.lab import sweep


def _point(status, error=None):
    return {"mode": "postcopy", "dirty_rate": "idle", "link": "unlimited", "memory": "64MiB",
            "repeat": 0, "status": status, "error": error, "stats": None}


def _run(monkeypatch, tmp_path, points, capsys):
    monkeypatch.setattr(sweep, "run_sweep",
                        lambda profile, link, progress: {"meta": {}, "points": points})
    import livemig.lab.sweepreport as report
    table = tmp_path / "t.md"
    table.write_text("table\n")
    monkeypatch.setattr(report, "write_outputs",
                        lambda result, out, stem: {"markdown": str(table)})
    rc = sweep.run_sweep_cli(profile="tiny", out_dir=str(tmp_path))
    return rc, capsys.readouterr()


def test_a_failed_run_exits_1_and_names_it(monkeypatch, tmp_path, capsys):
    rc, out = _run(monkeypatch, tmp_path,
                   [_point("completed"), _point("failed", "handover in doubt: peer refused")],
                   capsys)
    assert rc == 1
    assert "failed: postcopy idle unlimited 64MiB #0: handover in doubt" in out.err


def test_not_converged_and_unsupported_are_outcomes_not_failures(monkeypatch, tmp_path, capsys):
    rc, out = _run(monkeypatch, tmp_path,
                   [_point("completed"), _point("failed", "pre-copy did not converge: 30 rounds"),
                    _point("unsupported", "post-copy is not supported here")], capsys)
    assert rc == 0 and "failed:" not in out.err


def test_progress_counts_points_and_estimates_the_rest():
    assert sweep._eta(started=0.0, done=0, total=4) == ""
    import time
    eta = sweep._eta(started=time.time() - 60, done=2, total=4)
    assert eta.startswith(" ETA ") and eta.endswith("s")


def test_rate_labels_name_unpaced_rows_by_what_they_replay():
    assert sweep.rate_label(64) == "64MiB/s"
    assert sweep.rate_label(None) == "max"
    assert sweep.rate_label(None, "trace:/tmp/web.lmtrace") == "recorded"
    assert sweep.rate_label(32, "trace:/tmp/web.lmtrace") == "32MiB/s"
