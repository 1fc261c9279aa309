"""Host probe: JSON-able facts, consistent with the trackers' own probes."""
import json
import platform

from livemig.analysis import probe

from livemig.native import tracking


def test_probe_host_is_json_and_consistent():
    d = json.loads(json.dumps(probe.probe_host()))
    assert d["kernel"] == platform.release()
    assert set(d["trackers"]) == set(tracking.PREFERENCE)
    usable = [n for n in tracking.PREFERENCE if d["trackers"][n]["available"]]
    assert d["auto"] == (usable[0] if usable else None)
    assert d["trackers"]["mprotect"]["available"]
    for name, b in d["trackers"].items():
        assert b["available"] or b["reason"], name
    u = d["userfaultfd"]
    if u["available"]:
        assert probe.decode_bits(u["features_bits"], probe.UFFD_FEATURES) == u["features"]
        # uffd-async needs WP_ASYNC from UFFDIO_API and a working PAGEMAP_SCAN
        assert d["trackers"]["uffd-async"]["available"] == (
            "WP_ASYNC" in u["features"] and d["pagemap_scan"]["available"])
    text = probe.format_probe(d)
    assert d["kernel"] in text and "auto choice" in text and str(d["auto"]) in text


def test_decode_bits_names_known_and_unknown_bits():
    assert probe.decode_bits((1 << 15) | (1 << 13) | (1 << 40), probe.UFFD_FEATURES) == [
        "WP_UNPOPULATED", "WP_ASYNC", "bit40"]
    assert probe.decode_bits(0, probe.UFFD_FEATURES) == []


def test_backends_to_test_lists_every_backend_best_first():
    rows = probe.backends_to_test()
    assert [r[0] for r in rows] == list(tracking.PREFERENCE)
    assert all(isinstance(ok, bool) and (ok or reason) for _, ok, reason in rows)
