"""`stop_ray` stops every process of the local Ray it started, the autoscaler monitor first.

Run in a fresh interpreter: the test session's own Ray (other tests') must not be the one stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import os
from pathlib import Path
from flows.execute import _kill_own_autoscaler_monitor, start_ray, stop_ray

def children():
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
            found[int(entry.name)] = command
    return found

def alive(pid):
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

start_ray()
started = children()
monitors = [pid for pid, command in started.items() if "autoscaler" in command and "monitor.py" in command]
gcs = [pid for pid, command in started.items() if "gcs_server" in command]
assert len(monitors) == 1 and len(gcs) == 1, started
_kill_own_autoscaler_monitor()
assert not alive(monitors[0]) and alive(gcs[0])  # the monitor first, the rest still up
stop_ray()
left = [command for pid, command in started.items() if alive(pid)]
assert not left, left
print("stopped", len(started), "processes")
"""


def test_stop_ray_stops_the_monitor_first_and_then_everything() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("stopped ")
