"""`esb start`: supervises the arbiter, the scheduler, the pickup watcher and embedded Redis."""

from esb.launcher.children import pid_is_running
from esb.launcher.supervisor import (
    ROLES,
    Launcher,
    StartError,
    children_file,
    pid_file,
    running_launcher_pid,
)

__all__ = [
    "ROLES",
    "Launcher",
    "StartError",
    "children_file",
    "pid_file",
    "pid_is_running",
    "running_launcher_pid",
]
