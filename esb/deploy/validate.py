"""``python -m esb.deploy.validate FILE``: import a service module in a short-lived process.

A module runs code when imported; running it here first means one that fails to compile,
to import, or that hangs never reaches a worker. Prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from esb.errors import DeployError
from esb.service.loader import load_module, module_name_of, services_in


def check(path: Path) -> dict:
    try:
        name = module_name_of(path.name)
        source = path.read_text(encoding="utf-8")
        module = load_module(name, source, path.name)
        return {"ok": True, "module": name, "services": sorted(services_in(module))}
    except DeployError as exc:
        return {"ok": False, "reason": exc.reason, "line": exc.line}
    except (OSError, UnicodeDecodeError) as exc:
        return {"ok": False, "reason": f"cannot read: {exc}", "line": None}


if __name__ == "__main__":
    print(json.dumps(check(Path(sys.argv[1]))))
