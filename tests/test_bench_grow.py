"""tools/bench_grow.py runs end to end in its quick mode and reports every ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_the_quick_benchmark_prints_its_ratios(tmp_path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_grow.py"), "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "time ratio" in done.stdout and "memory ratio" in done.stdout
    results = json.loads(out.read_text())
    assert results["time_ratio"] > 0 and results["memory_ratio"] > 0
    assert [p["depth"] for p in results["planning"]] == [2, 4, 8]
    nodes = [p["nodes"] for p in results["planning"]]
    assert nodes == sorted(nodes) and nodes[0] < nodes[-1]
