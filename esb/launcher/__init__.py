"""`esb start`: supervises the arbiter, the scheduler, the pickup watcher and embedded Redis."""

from esb.launcher.pidfiles import Recorded, read_children_file, read_pid_file
from esb.launcher.supervisor import (
    ROLES,
    Launcher,
    StartError,
    children_file,
    pid_file,
    running_launcher,
)
from esb.observe.supervision import pid_is_running

__all__ = [
    "ROLES",
    "Launcher",
    "Recorded",
    "StartError",
    "children_file",
    "pid_file",
    "pid_is_running",
    "read_children_file",
    "read_pid_file",
    "running_launcher",
]
