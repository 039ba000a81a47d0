"""The process tree of a server: the pickup watcher is a thread of the launcher,
exactly one per server, and `esb stop` leaves no process behind."""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers import children_of, esb, pid_alive, wait_until

MODULE = '''
from esb import Service


class Once(Service):
    name = "t.once"

    def handle(self):
        self.response.payload = {"once": True}
'''


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _processes_mentioning(directory: Path) -> list[int]:
    """Every live process whose command line names DIRECTORY (launcher, arbiter, scheduler,
    deploy processes; workers are forks of the arbiter and carry its command line)."""
    return [int(p) for p in os.listdir("/proc")
            if p.isdigit() and str(directory) in _cmdline(int(p)) and pid_alive(int(p))]


def _tree(root: int) -> list[int]:
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid_alive(pid):
            found.append(pid)
            todo.extend(children_of(pid))
    return found


def _drop(pickup: Path, tmp_path: Path, name: str, text: str) -> Path:
    """Write NAME elsewhere and rename it into PICKUP: whole the moment it appears."""
    staged = tmp_path / name
    staged.write_text(text)
    os.rename(staged, pickup / name)
    return pickup / name


def test_one_pickup_watcher_a_thread_of_the_launcher_deploys_a_file_once(esb_server, tmp_path):
    server = esb_server()
    assert not [p for p in server.all_pids() if "esb.deploy.pickup" in _cmdline(p)]
    # A second launcher for the same directory is refused, so no second watcher either.
    second = esb("start", str(server.directory), "--fg", timeout_s=60)
    assert second.returncode != 0, second.stdout

    pickup = server.directory / "pickup"
    dropped = _drop(pickup, tmp_path, "once.py", MODULE)
    wait_until(lambda: not dropped.exists(), timeout_s=30, message="the watcher took the file")
    deployed = list((pickup / "deployed").glob("*-once.py"))
    assert len(deployed) == 1, deployed
    wait_until(lambda: "pickup: once.py: deployed module once version 1" in server.log(),
               message="the deploy logged in server.log")
    assert server.invoke("t.once").json() == {"once": True}
    log = server.log()
    assert log.count("pickup: once.py: deployed module once") == 1, log[-2000:]
    assert "deployed module once version 2" not in log


def test_stop_leaves_no_process_after_a_background_start_and_a_pickup_deploy(esb_server, tmp_path):
    server = esb_server(embedded_redis=True, start=False)
    directory = server.directory
    started = esb("start", str(directory))
    try:
        assert started.returncode == 0, started.stderr
        launchers = [p for p in _processes_mentioning(directory) if " start " in _cmdline(p)]
        assert len(launchers) == 1, launchers
        dropped = _drop(directory / "pickup", tmp_path, "once.py", MODULE)
        wait_until(lambda: not dropped.exists(), timeout_s=30, message="the watcher took the file")
        pids = set(_tree(launchers[0])) | set(_processes_mentioning(directory))
        # launcher, arbiter, 2 workers, scheduler, embedded Redis; no pickup process
        assert len(pids) >= 6, pids
    finally:
        stopped = esb("stop", str(directory))
    assert stopped.returncode == 0, stopped.stderr
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert _processes_mentioning(directory) == []


def _unix_listeners(pid: int) -> set[str]:
    """Paths of the unix sockets PID holds open (from /proc/net/unix by inode)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    paths = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes:
            paths.add(fields[7])
    return paths


def test_the_arbiter_opens_no_per_user_gunicorn_control_socket(esb_server):
    """gunicorn 27's control socket has one path per user: two servers would fight over it."""
    server = esb_server()
    arbiter = int((server.directory / "run" / "arbiter.pid").read_text())
    assert not [p for p in _unix_listeners(arbiter) if p.endswith("gunicorn.ctl")]
