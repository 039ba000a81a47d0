"""`esb start`: supervises the arbiter, the scheduler, the pickup watcher and embedded Redis."""

from esb.launcher.children import pid_is_running
from esb.launcher.pidfiles import Recorded, read_children_file, read_pid_file
from esb.launcher.supervisor import (
    ROLES,
    Launcher,
    StartError,
    children_file,
    pid_file,
    running_launcher,
)

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
