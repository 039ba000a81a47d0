"""The process tree of an idle server: memory of every process, and how long start and stop take.

A 2-worker server with the embedded Redis, made by ``esb quickstart`` in a temporary
directory. Each round: ``esb start`` is called while this process polls ``/esb/ping``
every 10 ms, so the start time is from the call to the first 200 (the command's own
return is printed beside it); after ``--idle-s`` seconds RSS and PSS (from
``/proc/PID/smaps_rollup``) of the launcher and every process below it are read; then
``esb stop`` is timed until it returns. Run by ``bench/run.py`` (``--tree-rounds``) or
alone:

    python bench/tree.py [--rounds 3] [--workers 2] [--idle-s 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ESB = [sys.executable, "-m", "esb.cli"]
TARGET_TOTAL_RSS_MB = 250.0
TARGET_START_S = 2.0
TARGET_STOP_S = 1.0


def _ppid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def descendants(root: int) -> list[int]:
    """ROOT and every process below it, parents before children."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = _ppid_of(int(entry))
            if ppid is not None:
                parents[int(entry)] = ppid
    found, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        found.append(pid)
        todo.extend(sorted(p for p, pp in parents.items() if pp == pid))
    return found


def launcher_of(directory: Path) -> int | None:
    """The pid of the ``esb start DIR --fg`` process serving DIRECTORY, found by its command line."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _cmdline(int(entry))
        if "start" in argv and "--fg" in argv and str(directory) in argv and "esb.cli" in argv:
            return int(entry)
    return None


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of PID in MB, from smaps_rollup."""
    rss = pss = float("nan")
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) / 1024
    return rss, pss


def role_of(pid: int, launcher: int, arbiter: int | None) -> str:
    argv = " ".join(_cmdline(pid))
    if pid == launcher:
        return "launcher"
    if arbiter is not None and _ppid_of(pid) == arbiter:
        return "worker"
    for marker, role in (("esb.server", "arbiter"), ("esb-server", "arbiter"), ("esb.scheduler", "scheduler"),
                         ("esb.deploy.pickup", "pickup"), ("redis-server", "redis")):
        if marker in argv:
            return role
    return argv[:40] or "?"


@dataclass
class Round:
    first_ping_s: float
    start_returned_s: float
    stop_s: float
    processes: list[tuple[str, int, float, float]]  # role, pid, RSS MB, PSS MB


def _ping(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as answer:
            return answer.status == 200
    except OSError:
        return False


def _esb(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*ESB, *args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"bench: esb {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done


def one_round(directory: Path, port: int, idle_s: float) -> Round:
    url = f"http://127.0.0.1:{port}/esb/ping"
    first: list[float] = []
    done = threading.Event()

    def poll(started: float) -> None:
        while not done.is_set():
            if _ping(url):
                first.append(time.monotonic() - started)
                return
            time.sleep(0.01)

    started = time.monotonic()
    poller = threading.Thread(target=poll, args=(started,), daemon=True)
    poller.start()
    _esb("start", str(directory))
    returned = time.monotonic() - started
    poller.join(timeout=30)
    done.set()
    time.sleep(idle_s)
    launcher = launcher_of(directory)
    if launcher is None:
        raise SystemExit("bench: cannot find the launcher's process")
    arbiter = int((directory / "run" / "arbiter.pid").read_text().strip())
    processes = []
    for pid in descendants(launcher):
        try:
            rss, pss = memory_mb(pid)
        except OSError:
            continue
        processes.append((role_of(pid, launcher, arbiter), pid, rss, pss))
    stop_started = time.monotonic()
    _esb("stop", str(directory))
    stop_s = time.monotonic() - stop_started
    return Round(first[0] if first else float("nan"), returned, stop_s, processes)


def run_tree(rounds: int, workers: int = 2, idle_s: float = 2.0) -> list[str]:
    """Print the tree benchmark; answer the targets it missed."""
    base = Path(tempfile.mkdtemp(prefix="esb-tree-"))
    directory = base / "server"
    port = _free_port()
    _esb("quickstart", str(directory), "--port", str(port), "--workers", str(workers))
    print(f"process tree: idle {workers}-worker server, embedded Redis, SQLite ODB, {rounds} round(s)")
    results = []
    try:
        for number in range(1, rounds + 1):
            result = one_round(directory, port, idle_s)
            results.append(result)
            total_rss = sum(p[2] for p in result.processes)
            total_pss = sum(p[3] for p in result.processes)
            print(f"  round {number}: start to first 200 {result.first_ping_s:5.2f} s "
                  f"(esb start returned after {result.start_returned_s:5.2f} s), "
                  f"esb stop {result.stop_s:5.2f} s, RSS {total_rss:6.1f} MB, PSS {total_pss:6.1f} MB")
    finally:
        subprocess.run([*ESB, "stop", str(directory)], capture_output=True, timeout=120)
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    last = results[-1]
    print(f"  processes, idle {idle_s:g} s after the last start:")
    print(f"    {'process':<10} {'pid':>7} {'RSS MB':>8} {'PSS MB':>8}")
    for role, pid, rss, pss in last.processes:
        print(f"    {role:<10} {pid:>7} {rss:8.1f} {pss:8.1f}")
    total_rss = statistics.median(sum(p[2] for p in r.processes) for r in results)
    total_pss = statistics.median(sum(p[3] for p in r.processes) for r in results)
    start_s = statistics.median(r.first_ping_s for r in results)
    stop_s = statistics.median(r.stop_s for r in results)
    print(f"  median: all processes RSS {total_rss:.1f} MB (target < {TARGET_TOTAL_RSS_MB:g}), "
          f"PSS {total_pss:.1f} MB; start {start_s:.2f} s (target <= {TARGET_START_S:g}); "
          f"stop {stop_s:.2f} s (target <= {TARGET_STOP_S:g})")
    missed = []
    if total_rss >= TARGET_TOTAL_RSS_MB:
        missed.append(f"tree RSS {total_rss:.1f} MB >= {TARGET_TOTAL_RSS_MB:g} MB")
    if not start_s <= TARGET_START_S:
        missed.append(f"start {start_s:.2f} s > {TARGET_START_S:g} s")
    if stop_s > TARGET_STOP_S:
        missed.append(f"stop {stop_s:.2f} s > {TARGET_STOP_S:g} s")
    return missed


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--idle-s", type=float, default=2.0, help="wait after start before reading memory")
    args = parser.parse_args(argv)
    missed = run_tree(args.rounds, args.workers, args.idle_s)
    print("targets: " + ("met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
