"""What every benchmark script writes: its JSON under bench/results/ and a
Markdown table beside it (same name, ``.md``), the table also printed; and
the machine a run was measured on, with the load average around it (this
machine is shared: a ratio means something only within one run)."""
from __future__ import annotations

import json
import os
import platform


def machine(loadavg_before: tuple[float, float, float]) -> dict:
    """The machine, with the load average before the run (given) and now."""
    return {"cpus": os.cpu_count(), "kernel": platform.release(),
            "loadavg_before": loadavg_before, "loadavg_after": os.getloadavg()}


def write(out_path: str, results: dict, table: str) -> None:
    """``results`` as JSON at ``out_path``, ``table`` beside it as .md; print the table."""
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    with open(os.path.splitext(out_path)[0] + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
