"""The soak benchmark at CI size: `rtllm serve` with the demo model through a mix of valid,
cancelled, dropped, oversized and invalid requests while idle connections are held (and closed
by the server's 1 s header timeout); the script checks answers, refusals, KV blocks, RSS and
stream gaps, and exits non-zero on any failure."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_soak_serve_small(tmp_path):
    report_path = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "soak_serve.py"), "--requests", "300",
                             "--idle", "50", "--header-timeout", "1", "--json", str(report_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert all(report["checks"].values()) and report["failed"] == 0
    assert report["idle_connections_closed_by_server"] > 0
    assert sum(report["by_kind"].values()) == 300
