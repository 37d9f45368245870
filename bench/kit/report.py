"""Tables, plots, JSON and pass/fail reports of the benchmarks."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kit.bodies import ENCODINGS
from kit.load import PROFILE_ROWS, Rec, summarize
from kit.machine import say


def cpu_ms_per_request(row: dict[str, Any], server: str = "serve") -> dict[str, float]:
    """Server CPU ms per request of one level, by process group (a peer's row, `server` "peer" or
    "peer1": that peer's processes only)."""
    cpu = row["cpu"]
    window = cpu.get("window_s") or row["duration_s"]
    n = max(1, row["requests"])
    keep = (server,) if server in PEERS else tuple(k for k in SERVER_PROCESSES if k not in PEERS)
    return {k: round(v * window / n * 1000, 3) for k, v in cpu["per_process"].items() if k in keep}


SERVER_PROCESSES = (
    "Router",
    "Scorer",
    "ScorerControl",
    "Calibrator",
    "proxy",
    "controller",
    "ray-system",
    "ray-worker-other",
    "peer",
    "peer1",
)
PEERS = ("peer", "peer1")  # the fair peer (one uvicorn worker per core) and the one-worker peer


def fmt_profile(profile: dict[str, Any], encoding: str | None = None) -> str:
    """Rows = stages, columns = peer / graph / fused (+ graph - peer): medians in ms."""
    enc = encoding or profile.get("encoding")
    cols = profile.get("by_encoding", {}).get(enc) or {
        k: profile[k] for k in ("peer", "graph", "fused") if k in profile
    }
    names = [k for k in ("peer", "graph", "fused") if k in cols]
    delta = "peer" in cols and "graph" in cols
    head = f"{'median ms':<40}" + "".join(f"{n:>9}" for n in names) + (f"{'graph-peer':>12}" if delta else "")
    lines = [
        f"per-stage profile, c=1, {enc} bodies, {profile.get('requests')} sequential requests per server "
        "(Server-Timing; medians of per-request values)",
        head,
    ]

    def cell(v: float | None, width: int = 9) -> str:
        return f"{'-':>{width}}" if v is None else f"{v:>{width}.3f}"

    for key, label in PROFILE_ROWS:
        vals = [cols[n]["median_ms"].get(key) for n in names]
        line = f"{label:<40}" + "".join(cell(v) for v in vals)
        if delta:
            g, p = cols["graph"]["median_ms"].get(key), cols["peer"]["median_ms"].get(key)
            line += cell(None if g is None else g - (p or 0.0), 12)
        lines.append(line)
    lines.append(
        f"{'requests / errors / fallbacks':<40}"
        + "".join(
            f"{str(cols[n]['requests']) + '/' + str(cols[n]['errors']) + '/' + str(cols[n]['fallbacks']):>9}"
            for n in names
        )
    )
    return "\n".join(lines)


def fmt_cpu_per_request(result: dict[str, Any]) -> str:
    """Server CPU ms per request by process at each server's best-throughput level, next to the limit's
    (one core, the bare batched pipeline): where the CPU that caps throughput goes."""
    lines = ["server CPU ms per request by process, at each server's best-throughput level"]
    encodings = result.get("settings", {}).get("encodings") or list(result.get("limit", {}).get("by_encoding", {}))
    for enc in encodings:
        series = [
            ("graph", result.get("levels", []), "serve"),
            ("fused", result.get("fused", {}).get("levels", []), "serve"),
            ("peer", result.get("peer", {}).get("levels", []), "peer"),
            ("peer1", result.get("peer1", {}).get("levels", []), "peer1"),
        ]
        picked = [(name, best(rows, enc), kind) for name, rows, kind in series]
        picked = [(name, r, cpu_ms_per_request(r, kind)) for name, r, kind in picked if r is not None]
        procs = [p for p in SERVER_PROCESSES if any(p in by for _, _, by in picked)]
        lines.append(
            f"{enc:<8}{'':<8}{'c':>4}{'req/s':>9}{'total':>8}" + "".join(f"{p:>{max(9, len(p) + 2)}}" for p in procs)
        )
        lim = result.get("limit", {}).get("by_encoding", {}).get(enc)
        if lim:
            cpu_ms = lim["ms_per_request"] * lim.get("cpu_cores", 1.0)
            lines.append(
                f"{'':<8}{'limit':<8}{'-':>4}{lim['rps']:>9.1f}{cpu_ms:>8.3f}  (one core, batch {lim['batch_size']})"
            )
        multi = result.get("limit", {}).get("multi_core", {})
        if multi.get("by_encoding", {}).get(enc):
            lines.append(
                f"{'':<8}{'limit' + str(multi['cores']):<8}{'-':>4}{multi['by_encoding'][enc]['rps']:>9.1f}"
                f"{'':>8}  ({multi['cores']} processes, one per core, summed)"
            )
        for name, r, by in picked:
            lines.append(
                f"{'':<8}{name:<8}{r['concurrency']:>4}{r['rps']:>9.1f}{sum(by.values()):>8.3f}"
                + "".join(
                    f"{by[p]:>{max(9, len(p) + 2)}.3f}" if p in by else f"{'-':>{max(9, len(p) + 2)}}" for p in procs
                )
            )
    return "\n".join(lines)


def fmt_table(rows: list[dict[str, Any]], title: str) -> str:
    head = (
        f"{'enc':<7}{'c':>4}{'req/s':>9}{'p50':>9}{'p95':>9}{'p99':>9}{'err':>6}{'fb':>5}{'batch':>7}"
        f"{'box':>6}{'srv':>6}{'cli':>7}{'other':>6}{'ms/req':>8}  load"
    )
    lines = [title, head]
    for r in rows:
        b = r.get("scorer_batch_mean")
        lines.append(
            f"{r.get('encoding', ''):<7}{r['concurrency']:>4}{r['rps']:>9.1f}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['errors']:>6}{r['fallbacks']:>5}{('-' if b is None else f'{b:.1f}'):>7}"
            f"{r['cpu']['box_cores']:>6.2f}{r['cpu']['server_cores']:>6.2f}{r['cpu']['client_cores']:>6.3f}"
            f"{'!' if r.get('client_over_budget') else ' '}{r['cpu'].get('foreign_cores', 0.0):>6.2f}"
            f"{r['server_cpu_ms_per_request']:>8.2f}  {r['loadavg'][0]:.2f}"
        )
    if any(r.get("client_over_budget") for r in rows):
        lines.append("  ! the load generator used more CPU than allowed at this level: not comparable")
    return "\n".join(lines)


def fmt_summary(result: dict[str, Any]) -> str:
    """One line per server and encoding: best req/s (at c), p50 at c=1, and the graph's ratio to it."""
    lines = [f"{'':<30}{'enc':<8}{'best req/s':>11}{'at c':>6}{'p50 c=1':>9}  graph / this (req/s, p50 c=1)"]
    multi = result.get("limit", {}).get("multi_core", {})
    graph = result.get("levels", [])

    def line(name: str, enc: str, rps: float | None, c: Any, p50: float | None, ratio: str) -> str:
        rps_s = "-" if rps is None else f"{rps:.1f}"
        p50_s = "-" if p50 is None else f"{p50:.2f}"
        return f"{name:<30}{enc:<8}{rps_s:>11}{c!s:>6}{p50_s:>9}  {ratio}"

    for enc in result.get("settings", {}).get("encodings") or ENCODINGS:
        g, g1 = best(graph, enc), at(graph, enc, 1)
        g_rps = g["rps"] if g else None
        lines.append(line("cotrr-ray graph", enc, g_rps, g["concurrency"] if g else "-", g1 and g1["p50_ms"], ""))
        peers = [
            ("peer", f"fair peer ({result.get('peer', {}).get('workers', 1)} workers)"),
            ("peer1", "peer (1 worker)"),
        ]
        for key, name in peers:
            if key not in result:
                continue
            b, b1 = best(result[key]["levels"], enc), at(result[key]["levels"], enc, 1)
            r, r1 = _ratio(g_rps, b and b["rps"]), _ratio(g1 and g1["p50_ms"], b1 and b1["p50_ms"])
            lines.append(
                line(name, enc, b and b["rps"], b["concurrency"] if b else "-", b1 and b1["p50_ms"], f"{r}x, p50 {r1}x")
            )
        lim = result.get("limit", {}).get("by_encoding", {}).get(enc)
        if lim:
            lines.append(line("limit (1 core)", enc, lim["rps"], "-", None, f"{_ratio(g_rps, lim['rps'])}x"))
        m = multi.get("by_encoding", {}).get(enc)
        if m:
            lines.append(
                line(f"limit ({multi['cores']} cores)", enc, m["rps"], "-", None, f"{_ratio(g_rps, m['rps'])}x")
            )
    return "\n".join(lines)


def plot_serve(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {"cotrr-ray": "-o", "peer": "--s", "peer 1 worker": "--+", "fused": ":^", "no coalescing": "-.x"}
    workers = result.get("peer", {}).get("workers")
    series = {
        "cotrr-ray": result["levels"],
        "peer": result.get("peer", {}).get("levels", []),
        "peer 1 worker": result.get("peer1", {}).get("levels", []),
        "fused": result.get("fused", {}).get("levels", []),
        "no coalescing": result.get("no_coalescing", {}).get("levels", []),
    }
    colors = {"json": "tab:blue", "base64": "tab:orange"}
    for name, rows in series.items():
        for enc in ENCODINGS:
            rr = sorted([r for r in rows if r["encoding"] == enc], key=lambda r: r["concurrency"])
            if not rr:
                continue
            cs = [r["concurrency"] for r in rr]
            label = f"peer {workers} workers" if name == "peer" and workers else name
            axes[0].plot(cs, [r["rps"] for r in rr], styles[name], color=colors[enc], label=f"{label} {enc}")
            axes[1].plot(cs, [r["p50_ms"] for r in rr], styles[name], color=colors[enc], label=f"{name} {enc} p50")
    for enc in ENCODINGS:
        lim = result.get("limit", {}).get("by_encoding", {}).get(enc)
        if lim:
            axes[0].axhline(lim["rps"], color=colors[enc], alpha=0.4, lw=1, label=f"limit {enc} (1 core)")
        multi = result.get("limit", {}).get("multi_core", {})
        if multi.get("by_encoding", {}).get(enc):
            axes[0].axhline(
                multi["by_encoding"][enc]["rps"],
                color=colors[enc],
                alpha=0.4,
                lw=1,
                ls="--",
                label=f"limit {enc} ({multi['cores']} cores)",
            )
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed loop)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("requests / s")
    axes[0].set_title("throughput")
    axes[1].set_ylabel("ms")
    axes[1].set_yscale("log")
    axes[1].set_title("p50 latency")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    m = result["machine"]
    save_figure(
        fig,
        path,
        f"cotrr-ray serving: Ray Serve graph vs peer (FastAPI) vs limit — {m['logical_cpus']} CPUs, "
        f"{m['cpu_model'][:40]}",
    )


def save_figure(fig: Any, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    scenario: str
    checks: list[Check] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        say(f"  {'PASS' if ok else 'FAIL'}  {name}  {detail}")
        return bool(ok)

    def note(self, name: str, detail: str) -> None:
        """An observation that is reported but neither passes nor fails."""
        self.data.setdefault("notes", []).append({"name": name, "detail": detail})
        say(f"  INFO  {name}  {detail}")

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "pass": self.passed,
            "checks": [c.__dict__ for c in self.checks],
            **self.data,
        }


def best(rows: list[dict[str, Any]], encoding: str) -> dict[str, Any] | None:
    cand = [r for r in rows if r["encoding"] == encoding and r["errors"] == 0]
    return max(cand, key=lambda r: r["rps"]) if cand else None


def at(rows: list[dict[str, Any]], encoding: str, c: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["encoding"] == encoding and r["concurrency"] == c), None)


def jsonable(x: Any) -> Any:
    """Plain JSON types all the way down (numpy scalars to Python numbers, keys to strings)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def bench_parser(doc: str, *, quick: str, json: str, png: str) -> argparse.ArgumentParser:
    """The parser every plotting bench starts from: its docstring's first line, --quick, --json, --png."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--json", default=None, help=json)
    p.add_argument("--png", default=None, help=png)
    return p


def write_outputs(result: dict[str, Any], json_path: str | Path, png: str | Path | None, plot: Any) -> None:
    """The result as JSON (indent 1) and its plot (default: the JSON path with .png)."""
    out = write_json(result, Path(json_path), indent=1)
    png = Path(png) if png else out.with_suffix(".png")
    plot(result, png)
    say(f"wrote {out} and {png} ({result['wall_s']:.0f} s)")


def write_json(result: dict[str, Any], path: Path, *, newline: bool = False, **dump: Any) -> Path:
    """`result` as JSON at `path` (parents created), written whole: a temporary file renamed over it,
    so an interrupted run never leaves a torn result; `dump`: json.dumps keywords."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, **dump) + ("\n" if newline else ""))
    tmp.replace(path)
    return path


def load_windows(records: list[Rec], timeline: list[dict[str, Any]], t_stop: float) -> list[dict[str, Any]]:
    """Requests, throughput and latency per 5-s window, next to the replica counts at its end."""
    windows = []
    for t0 in range(0, int(t_stop) + 1, 5):
        s = summarize(records, t0, t0 + 5)
        if s["requests"]:
            at = [x for x in timeline if t0 <= x["t"] < t0 + 5] or [{}]
            windows.append(
                {
                    "t": f"{t0}-{t0 + 5}",
                    "concurrency": at[-1].get("concurrency"),
                    "requests": s["requests"],
                    "rps": s["throughput_rps"],
                    "p50_ms": s["latency_ms"]["p50"],
                    "p99_ms": s["latency_ms"]["p99"],
                    "failed": s["failed"],
                    "fallbacks": sum(s["fallbacks"].values()),
                    "scorer_running": at[-1].get("Scorer", {}).get("RUNNING"),
                    "calibrator_running": at[-1].get("Calibrator", {}).get("RUNNING"),
                }
            )
    return windows


def print_windows(windows: list[dict[str, Any]]) -> None:
    say(
        f"  {'t(s)':>7} {'c':>3} {'req':>5} {'rps':>6} {'p50':>7} {'p99':>7} {'fail':>4} {'fb':>4} {'scorers':>7} {'calib':>5}"
    )
    for w in windows:
        say(
            f"  {w['t']:>7} {w['concurrency']!s:>3} {w['requests']:>5} {w['rps']!s:>6} {w['p50_ms']!s:>7} "
            f"{w['p99_ms']!s:>7} {w['failed']:>4} {w['fallbacks']:>4} {w['scorer_running']!s:>7} {w['calibrator_running']!s:>5}"
        )


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(
    levels: list[dict],
    peer: list[dict],
    limit: dict[str, dict],
    *,
    peer1: list[dict] | None = None,
    limit_multi: dict[str, dict] | None = None,
) -> dict[str, Any]:
    """The graph against the fair peer (`peer`: one worker per core), the one-worker peer (`peer1`),
    the one-core limit and the multi-core limit: best throughput of each side, p50 at c=1."""
    by = {}
    for enc in ENCODINGS:
        s, p, s1, p1 = best(levels, enc), best(peer, enc), at(levels, enc, 1), at(peer, enc, 1)
        q, q1 = best(peer1 or [], enc), at(peer1 or [], enc, 1)
        lim, limn = limit.get(enc), (limit_multi or {}).get(enc)
        by[enc] = {
            "rps_vs_peer": _ratio(s and s["rps"], p and p["rps"]),
            "rps_vs_limit": _ratio(s and s["rps"], lim and lim["rps"]),
            "p50_vs_peer": _ratio(s1 and s1["p50_ms"], p1 and p1["p50_ms"]),
            "rps_vs_peer_1worker": _ratio(s and s["rps"], q and q["rps"]),
            "p50_vs_peer_1worker": _ratio(s1 and s1["p50_ms"], q1 and q1["p50_ms"]),
            "rps_vs_limit_multicore": _ratio(s and s["rps"], limn and limn["rps"]),
            "best_concurrency": s["concurrency"] if s else None,
            "peer_best_concurrency": p["concurrency"] if p else None,
        }
    first = next((e for e in ENCODINGS if e in by and by[e]["rps_vs_peer"] is not None), ENCODINGS[0])
    return {
        "rps_vs_peer": by[first]["rps_vs_peer"],
        "rps_vs_limit": by[first]["rps_vs_limit"],
        "p50_vs_peer": by[first]["p50_vs_peer"],
        "encoding": first,
        "by_encoding": by,
    }


def targets(result: dict[str, Any]) -> dict[str, Any]:
    levels, r = result["levels"], result["ratios"]["by_encoding"]
    c64 = [x for x in levels if x["concurrency"] == 64]
    b64_c1 = at(levels, "base64", 1)
    out = {}
    for enc, v in r.items():
        out[f"rps_vs_peer>=0.8[{enc}]"] = None if v["rps_vs_peer"] is None else v["rps_vs_peer"] >= 0.8
        out[f"rps_vs_limit>=0.75[{enc}]"] = None if v["rps_vs_limit"] is None else v["rps_vs_limit"] >= 0.75
        out[f"p50_c1_vs_peer<=1.5[{enc}]"] = None if v["p50_vs_peer"] is None else v["p50_vs_peer"] <= 1.5
    out["zero_errors_at_c64"] = all(x["errors"] == 0 for x in c64) if c64 else None
    out["base64_p50_c1<=12ms"] = None if b64_c1 is None else b64_c1["p50_ms"] <= 12.0
    ov = result.get("overload")
    if ov:
        out["overload_shed_with_503_retry_after"] = ov["status_503"] > 0 and ov["retry_after"] == ov["status_503"]
    return out


def print_report(result: dict[str, Any]) -> None:
    print()
    print(
        f"machine: {result['machine']['cpu_model']} x{result['machine']['logical_cpus']}, "
        f"load before {result['load']['before']} after {result['load']['after']}, client {result['settings']['client']}, "
        f"mode {result['settings']['mode']} ({result['settings'].get('target')})"
    )
    client = result.get("client", {})
    print(
        f"load generator: {client.get('kind')} ({client.get('version')}), most cores used in a level "
        f"{client.get('max_cores_used')} (allowed {client.get('max_cores_allowed')})"
    )
    if client.get("ok") is False:
        print(
            f"WARNING: the load generator used more than {client.get('max_cores_allowed')} cores in "
            f"{client.get('over_budget_levels')} level(s): it took CPU from the servers; those figures (marked !) "
            "are not comparable. Install wrk (apt-get install -y wrk)."
        )
    for enc, lim in result["limit"]["by_encoding"].items():
        print(
            f"limit {enc}: {lim['rps']:.1f} req/s ({lim['ms_per_request']:.3f} ms/req, batch {lim['batch_size']}) "
            f"stages {lim['stages_ms_per_request']}"
        )
    multi = result["limit"].get("multi_core")
    if multi:
        for enc, lim in multi["by_encoding"].items():
            per = [p["rps"] for p in lim["by_process"]]
            print(f"limit {enc} on {multi['cores']} cores: {lim['rps']:.1f} req/s (processes: {per})")
    print(fmt_table(result["levels"], "\ncotrr-ray (Router -> Scorer -> Calibrator)"))
    if "peer" in result:
        w = result["peer"].get("workers", 1)
        print(fmt_table(result["peer"]["levels"], f"\nfair peer (FastAPI + uvicorn, {w} workers)"))
    if "peer1" in result:
        print(fmt_table(result["peer1"]["levels"], "\npeer, one uvicorn worker"))
    if "fused" in result:
        print(fmt_table(result["fused"]["levels"], "\nfused (calibration in the Scorer)"))
    if "no_coalescing" in result:
        print(fmt_table(result["no_coalescing"]["levels"], "\nablation: no router-side coalescing"))
    if "scaleout" in result:
        print(fmt_table(result["scaleout"]["levels"], "\nscale-out: 2 Scorer replicas (pinned)"))
        print(f"ratio 2 replicas / 1 replica: {result['scaleout']['ratio_2_vs_1']}")
    if "overload" in result:
        o = result["overload"]
        print(
            f"\noverload c={o['concurrency']} (router cap {o['router_admission_cap']}): {o['rps']:.1f} req/s, "
            f"503: {o['status_503']} (Retry-After on {o['retry_after']}), other errors "
            f"{o['errors'] - o['status_503']}, fallbacks {o['fallbacks']}, p50 {o['p50_ms']:.1f} ms"
        )
    if "hop_probe" in result:
        print(f"\nServe hop floor (median round trip replica -> replica at c=1): {result['hop_probe']}")
    if "profile" in result:
        for enc in result["profile"].get("by_encoding", {}) or [result["profile"].get("encoding")]:
            print("\n" + fmt_profile(result["profile"], enc))
    print("\n" + fmt_cpu_per_request(result))
    print(
        f"\nlevels re-measured because other processes loaded the box: {result.get('retried_levels', 0)}; "
        f"still noisy after waiting: {result.get('noisy_levels', 0)}"
    )
    print("\n" + fmt_summary(result))
    print("ratios:", json.dumps(result["ratios"]["by_encoding"]))
    print("targets:", json.dumps(result["targets"], indent=1))
