"""Machine info, box load and /proc CPU accounting of our own process tree."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def _ray_version() -> str | None:
    try:
        import ray
    except ImportError:
        return None
    return ray.__version__


def machine_info(*, serving: bool = False) -> dict[str, Any]:
    """CPU, GPU and library versions; `serving` adds host, memory, kernel, the HTTP stack and wrk."""
    import torch

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": _ray_version(),
    }
    if serving:
        info.update(_serving_info())
    return info


def run_header(*, serving: bool = False) -> dict[str, Any]:
    """The first keys of every result JSON: the machine, the command as run, when, and the load
    average before (a bench adds ``load["after"]`` when it ends)."""
    return {
        "machine": machine_info(serving=serving),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load": {"before": loadavg()},
    }


def _serving_info() -> dict[str, Any]:
    import fastapi
    import numpy as np
    import pydantic
    import uvicorn

    mem_gib = None
    with contextlib.suppress(OSError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem_gib = round(kb / 2**20, 1)
    wrk = shutil.which("wrk")
    return {
        "hostname": socket.gethostname(),
        "mem_gib": mem_gib,
        "kernel": platform.release(),
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "pydantic": pydantic.__version__,
        "numpy": np.__version__,
        "wrk": subprocess.run([wrk, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        if wrk
        else None,
    }


def basic_machine() -> dict[str, Any]:
    """The short machine record of reliability and quality_bench results."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}


def _box_busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


_CLK = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK
    except (OSError, IndexError, ValueError):
        return None


def _proc_name(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
    return raw


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(d.name))
    return out


def descendants(root: int) -> list[int]:
    """Every process below `root` (ours only: Ray's daemons, workers, replicas, servers we started)."""
    children = _children_map()
    out, stack = [], [root]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def process_group(cmdline: str) -> str:
    """A short label for one of our processes, for the per-process CPU table."""
    for key, label in (
        ("ServeReplica:rerank:Router", "Router"),
        ("ServeReplica:rerank:ScorerControl", "ScorerControl"),
        ("ServeReplica:rerank:Scorer", "Scorer"),
        ("ServeReplica:rerank:Calibrator", "Calibrator"),
        ("ProxyActor", "proxy"),
        ("ServeController", "controller"),
        ("peer_app.py", "peer"),
        ("wrk", "client"),
        ("serve_bench_client", "client"),
    ):
        if key in cmdline:
            return label
    if any(k in cmdline for k in ("raylet", "gcs_server", "dashboard", "agent", "log_monitor", "monitor.py")):
        return "ray-system"
    if "ray::" in cmdline or "default_worker" in cmdline:
        return "ray-worker-other"
    return "other"


INHERITED_LABELS = ("peer", "peer1")
"""Groups whose child processes count as the parent (uvicorn's spawned workers: their command line
is multiprocessing's, not the server's)."""


def labeled_descendants(root: int, labels: dict[int, str] | None = None) -> dict[int, str]:
    """{pid: group} of every process below `root`: `labels` (pid -> group, e.g. the peer's
    supervisor) first, then the command line; a child of an `INHERITED_LABELS` process inherits it."""
    children = _children_map()
    labels = labels or {}
    out: dict[int, str] = {}
    stack = [(root, None)]
    while stack:
        pid, parent_label = stack.pop()
        for c in children.get(pid, []):
            label = labels.get(c) or (parent_label if parent_label in INHERITED_LABELS else None)
            label = label or process_group(_proc_name(c))
            out[c] = label
            stack.append((c, label))
    return out


class CpuMeter:
    """Box-wide busy cores from /proc/stat and per-process CPU of our own process tree."""

    def __init__(self) -> None:
        self.root = os.getpid()
        self.labels: dict[int, str] = {}  # pid -> group for processes the command line does not name

    def snapshot(self) -> dict[str, Any]:
        busy, total = _box_busy_jiffies()
        procs = {}
        for pid, label in labeled_descendants(self.root, self.labels).items():
            cpu = _proc_cpu_s(pid)
            if cpu is not None:
                procs[pid] = (label, cpu)
        self_cpu = sum(os.times()[:2])
        return {"t": time.monotonic(), "busy": busy, "total": total, "procs": procs, "self": self_cpu}

    def foreign_now(self, window_s: float = 2.0) -> float:
        """Cores that processes outside our tree use over the next `window_s` seconds."""
        a = self.snapshot()
        time.sleep(window_s)
        return self.delta(a, self.snapshot())["foreign_cores"]

    @staticmethod
    def delta(a: dict[str, Any], b: dict[str, Any], client_cpu_s: float | None = None) -> dict[str, Any]:
        wall = b["t"] - a["t"]
        ncpu = os.cpu_count() or 1
        box = (b["busy"] - a["busy"]) / max(1, b["total"] - a["total"]) * ncpu
        groups: dict[str, float] = {}
        for pid, (label, cpu) in b["procs"].items():
            before = a["procs"][pid][1] if pid in a["procs"] else 0.0  # started during the window: from 0
            groups[label] = groups.get(label, 0.0) + max(0.0, cpu - before)
        groups["bench-driver"] = b["self"] - a["self"]
        if client_cpu_s is not None:  # a client that exited before the snapshot (rusage of the child)
            groups["client"] = client_cpu_s
        per = {k: round(v / wall, 3) for k, v in sorted(groups.items()) if v > 0}
        client = per.get("client", 0.0)
        server = sum(v for k, v in per.items() if k not in ("client", "bench-driver", "other"))
        ours = sum(per.values())
        return {
            "window_s": round(wall, 3),
            "box_cores": round(box, 3),
            "client_cores": client,
            "server_cores": round(server, 3),
            "foreign_cores": round(max(0.0, box - ours), 3),
            "per_process": per,
        }


def foreign_during(fn: Callable[[], Any], meter: CpuMeter, window_s: float = 1.0) -> tuple[Any, float]:
    """`fn()` and the median cores used by processes not ours over 1-s windows while it ran.

    Windows, not one delta over the run: Ray Train's worker processes exit when `fit` returns, and a
    process gone by the closing snapshot takes its CPU time out of "ours", so a whole-run delta would
    book the workers as foreign. Only the window a process exits in is affected; the median ignores it.
    """
    windows: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        a = meter.snapshot()
        while not stop.wait(window_s):
            b = meter.snapshot()
            windows.append(meter.delta(a, b)["foreign_cores"])
            a = b

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        stop.set()
        t.join()
    return out, (statistics.median(windows) if windows else 0.0)


def remeasure_while_noisy(
    measure: Callable[[], dict[str, Any]],
    foreign_of: Callable[[dict[str, Any]], float],
    *,
    meter: CpuMeter,
    max_foreign: float | None,
    deadline: float,
    note: Callable[[float], None],
) -> tuple[dict[str, Any], int]:
    """`measure()` again while other people's processes used more than `max_foreign` cores during it
    (shared machines), after waiting for the box to calm down; past `deadline` (time.monotonic) the
    last result is kept and flagged `noisy`. Returns the result and the number of re-measurements."""
    retries = 0
    while True:
        out = measure()
        foreign = foreign_of(out)
        if max_foreign is None or foreign <= max_foreign:
            return out, retries
        if time.monotonic() > deadline:
            out["noisy"] = True
            return out, retries
        note(foreign)
        while time.monotonic() < deadline and meter.foreign_now() > max_foreign:
            pass
        retries += 1


def calm_run(
    fn: Callable[[], dict[str, Any]], *, max_foreign: float | None, max_wait_s: float = 180.0
) -> dict[str, Any]:
    """Run `fn()` measuring the cores other people's processes used meanwhile (median of 1-s windows);
    run again when that exceeds `max_foreign` (`remeasure_while_noisy`). Adds `foreign_cores`, `retries`."""
    meter = CpuMeter()
    last = {"foreign": 0.0}

    def measure() -> dict[str, Any]:
        out, last["foreign"] = foreign_during(fn, meter)
        out["foreign_cores"] = round(last["foreign"], 3)
        return out

    out, retries = remeasure_while_noisy(
        measure,
        lambda _: last["foreign"],
        meter=meter,
        max_foreign=max_foreign,
        deadline=time.monotonic() + max_wait_s,
        note=lambda f: say(f"  {f:.2f} cores used by other processes during the run: waiting, then again"),
    )
    out["retries"] = retries
    return out
