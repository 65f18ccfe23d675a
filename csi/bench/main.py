"""``elv bench``: measure ELV over its real unix socket, as the sidecars drive it.

Every figure that has a target is a ratio measured side by side in the same
run (the machine is shared and noisy); absolute times are reported with it.
Output: a table on the terminal, a JSON file, a PNG plot, and (with
``--quick``) the figures as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from typing import Any

from csi import __version__
from csi.bench import sections
from csi.bench.harness import Target, scratch

DEFAULT_PEER = os.path.expanduser("~/.cache/elv-tools/bin/hostpathplugin")
TARGETS = {
    "overhead_ratio": 1.10,
    "throughput_16_per_s": 40.0,
    "scale_p99_ratio": 1.5,
    "restart_1000_s": 2.0,
    "idle_rss_mb": 60.0,
    "rss_10000_mb": 120.0,
    "datapath_ratio": 0.90,
}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="benchmark ELV against the raw tools and a peer driver")
    p.add_argument("--quick", action="store_true", help="a smaller run (< 2 min); last line is one JSON object")
    p.add_argument("--out", default="bench-out", help="directory for results.json and the plot")
    p.add_argument("--peer", default=DEFAULT_PEER, help="hostpathplugin binary (csi-driver-host-path) to compare with")
    p.add_argument("--sections", default="latency,overhead,throughput,scale,datapath,peer")
    p.add_argument("--scale-levels", default=None, help="comma list; default 10,1000 (quick) or 10,1000,10000")


def machine() -> dict[str, Any]:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    q = args.quick
    want = set(args.sections.split(","))
    levels = (
        [int(x) for x in args.scale_levels.split(",")]
        if args.scale_levels
        else ([10, 1000] if q else [10, 1000, 10000])
    )
    res: dict[str, Any] = {"version": __version__, "quick": q, "machine": machine(), "started": time.time()}
    with scratch() as base:
        elv = Target.elv(base)
        res["startup_s"] = await elv.start()
        try:
            if "latency" in want:
                res["latency"] = await sections.latency(elv, 5 if q else 20)
            if "overhead" in want:
                res["overhead"] = await sections.overhead(elv, 10 if q else 40)
            if "throughput" in want:
                res["throughput"] = await sections.throughput(elv, [1, 4, 16, 64], 2 if q else 4)
            if "datapath" in want:
                res["datapath"] = await sections.datapath(elv, 2 if q else 5, rounds=1 if q else 3)
            if "scale" in want:
                res["scale"] = await sections.scale(elv, levels, 20 if q else 100)
            if "peer" in want:
                res["peer"] = await peer(elv, args.peer, q)
        finally:
            await elv.stop()
    res["summary"] = summarize(res)
    return res


async def peer(elv: Target, binary: str, quick: bool) -> dict[str, Any]:
    if not os.access(binary, os.X_OK):
        return {
            "error": f"no peer binary at {binary}: csi-driver-host-path is not served by the Go module proxy "
            "(403 for every version), so it cannot be built by `go install`; pass --peer PATH to one "
            "built from a local checkout"
        }
    out: dict[str, Any] = {}
    n, clients = (5, 16) if quick else (20, 16)
    with scratch("bench-peer") as base:
        hp = Target.hostpath(base, binary)
        await hp.start()
        try:
            for kind, fs in (("mount", "ext4"), ("block", None)):
                mine = await sections.peer_sequences(elv, n, clients, fs)
                theirs = await sections.peer_sequences(hp, n, clients, fs)
                shared = sorted(set(mine["latency"]) & set(theirs["latency"]))
                # The drivers split the work differently between RPCs (the peer attaches
                # a block volume's loop device at create, ELV at stage), so the whole
                # sequence is the fair comparison; the per-RPC ratios show where time goes.
                life = (
                    "CreateVolume",
                    "NodeStageVolume",
                    "NodePublishVolume",
                    "NodeUnpublishVolume",
                    "NodeUnstageVolume",
                    "DeleteVolume",
                )
                seq = sum(mine["latency"][op]["p50"] for op in life) / sum(theirs["latency"][op]["p50"] for op in life)
                out[kind] = {
                    "elv": mine,
                    "hostpath": theirs,
                    "latency_ratio_p50": {
                        op: mine["latency"][op]["p50"] / theirs["latency"][op]["p50"] for op in shared
                    },
                    "life_sequence_ratio": seq,
                    "throughput_ratio": mine["per_second"] / theirs["per_second"],
                }
        finally:
            await hp.stop()
    return out


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    if "overhead" in r:
        s["overhead_ratio"] = r["overhead"]["ratio"]
    if "throughput" in r:
        s["throughput_16_per_s"] = r["throughput"]["16"]["per_second"]
    sc = r.get("scale", {})
    levels = sorted(int(k) for k in sc if k.isdigit())
    if levels:
        s["idle_rss_mb"] = sc["idle_rss_bytes"] / 2**20
        s["scale_p99_ratio"] = sc[str(levels[-1])]["create_p99"] / sc[str(levels[0])]["create_p99"]
        s["scale_top_level"] = levels[-1]
        if "1000" in sc:
            s["restart_1000_s"] = sc["1000"]["restart_to_ready_s"]
        if "10000" in sc:
            s["rss_10000_mb"] = sc["10000"]["rss_bytes"] / 2**20
    dp = r.get("datapath", {})
    ratios = [v["iops_ratio"] for k, v in dp.items() if isinstance(v, dict) and "iops_ratio" in v]
    if ratios:
        s["datapath_ratio"] = min(ratios)
    pr = r.get("peer", {})
    for kind in ("mount", "block"):
        if kind in pr:
            s[f"peer_{kind}_throughput_ratio"] = pr[kind]["throughput_ratio"]
            s[f"peer_{kind}_life_sequence_ratio"] = pr[kind]["life_sequence_ratio"]
    return s


def verdict(key: str, value: float) -> str:
    target = TARGETS.get(key)
    if target is None:
        return ""
    higher_is_better = key in ("throughput_16_per_s", "datapath_ratio")
    ok = value >= target if higher_is_better else value <= target
    return f"{'meets' if ok else 'MISSES'} {'>=' if higher_is_better else '<='} {target:g}"


MS = 1000.0


def print_table(r: dict[str, Any]) -> None:
    print(f"ELV {r['version']} benchmark on {r['machine']['cpus']} CPUs, kernel {r['machine']['kernel']}")
    for section in (_latency_lines, _overhead_lines, _throughput_lines, _scale_lines, _datapath_lines, _peer_lines):
        for line in section(r):
            print("  " + line)
    print("summary:")
    for k, v in r["summary"].items():
        print(f"  {k:<32} {v:10.3f}  {verdict(k, v)}")


def _latency_lines(r: dict[str, Any]) -> list[str]:
    return [
        f"latency {fs:<9} {op:<24} p50 {v['p50'] * MS:8.1f} ms   p99 {v['p99'] * MS:8.1f} ms"
        for fs in ("ext4", "xfs", "xfs-extra")
        for op, v in r.get("latency", {}).get(fs, {}).items()
    ]


def _overhead_lines(r: dict[str, Any]) -> list[str]:
    if "overhead" not in r:
        return []
    o = r["overhead"]
    return [f"whole life: ELV {o['elv_s'] * MS:.1f} ms, raw tools {o['raw_s'] * MS:.1f} ms, ratio {o['ratio']:.3f}"]


def _throughput_lines(r: dict[str, Any]) -> list[str]:
    return [
        f"throughput {c:>2} clients: {v['per_second']:6.1f} volumes/s (create+stage+publish p99 {v['p99'] * MS:.0f} ms)"
        for c, v in r.get("throughput", {}).items()
    ]


def _scale_lines(r: dict[str, Any]) -> list[str]:
    return [
        f"scale {k:>6}: create p99 {v['create_p99'] * MS:6.1f} ms, list {v['list_s'] * MS:7.1f} ms, "
        f"capacity {v['capacity_s'] * MS:5.1f} ms, restart {v['restart_to_ready_s']:.2f} s, "
        f"RSS {v['rss_bytes'] / 2**20:.0f} MB"
        for k, v in r.get("scale", {}).items()
        if k.isdigit()
    ]


def _datapath_lines(r: dict[str, Any]) -> list[str]:
    return [
        f"fio {k:<13} volume {v['volume']['iops']:9.0f} IOPS, pool fs {v['pool_fs']['iops']:9.0f} IOPS, "
        f"ratio {v['iops_ratio']:.3f}"
        for k, v in r.get("datapath", {}).items()
        if isinstance(v, dict)
    ]


def _peer_lines(r: dict[str, Any]) -> list[str]:
    out = []
    for kind, v in r.get("peer", {}).items():
        if isinstance(v, dict) and "throughput_ratio" in v:
            lat = ", ".join(f"{op} {x:.2f}" for op, x in v["latency_ratio_p50"].items())
            out.append(
                f"vs hostpath ({kind}): whole-life sequence ratio {v['life_sequence_ratio']:.2f}, "
                f"throughput ratio {v['throughput_ratio']:.2f}; per-RPC p50 ratios: {lat}"
            )
        elif kind == "error":
            out.append(f"peer: {v}")
    return out


def plot(r: dict[str, Any], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no plot"
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    tp = r.get("throughput", {})
    if tp:
        xs = [int(c) for c in tp]
        a.plot(xs, [tp[str(c)]["p50"] * 1000 for c in xs], "o-", label="p50")
        a.plot(xs, [tp[str(c)]["p99"] * 1000 for c in xs], "s--", label="p99")
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent clients")
        a.set_ylabel("create+stage+publish latency (ms)")
        a.set_title("Latency against concurrency")
        a.legend()
    sc = r.get("scale", {})
    levels = sorted(int(k) for k in sc if k.isdigit())
    if levels:
        b.plot(levels, [sc[str(k)]["create_p50"] * 1000 for k in levels], "o-", label="CreateVolume p50")
        b.plot(levels, [sc[str(k)]["create_p99"] * 1000 for k in levels], "s--", label="CreateVolume p99")
        b.set_xscale("log")
        b.set_xlabel("volumes on the node")
        b.set_ylabel("latency (ms)")
        b.set_title("Latency against volume count")
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("elv bench: needs root (loop devices and mounts)")
        return 1
    res = asyncio.run(run(args))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    note = plot(res, os.path.join(args.out, "bench.png"))
    print_table(res)
    print(f"wrote {args.out}/results.json" + (f"; {note}" if note else f" and {args.out}/bench.png"))
    if args.quick:
        print(json.dumps({"summary": res["summary"], "quick": True}, sort_keys=True))
    return 0
