"""Services: the developer-facing base class, loading modules, running calls."""

from esb.service.base import AmqpInfo, HttpInfo, JobInfo, Request, Response, Service
from esb.service.loader import ServiceStore, load_module, module_name_of, services_in
from esb.service.runtime import ServiceRuntime

__all__ = [
    "AmqpInfo",
    "HttpInfo",
    "JobInfo",
    "Request",
    "Response",
    "Service",
    "ServiceRuntime",
    "ServiceStore",
    "load_module",
    "module_name_of",
    "services_in",
]
