"""The sans-IO layers never import trio (checked in a fresh interpreter each).

Whole packages are checked: every module found in them today and tomorrow, not a
hand-kept list.  Plus the top-level modules and the synchronous store code that the
contract names sans-IO.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import tidings.routing
import tidings.wire

SANS_IO_PACKAGES = [tidings.wire, tidings.routing]
SANS_IO_MODULES = ["tidings.config", "tidings.auth", "tidings.log", "tidings.service.reload",
                   "tidings.store.records", "tidings.store.search", "tidings.store.memory",
                   "tidings.store.sqlite_db", "tidings.store.sqlite_webhooks",
                   "tidings.webhooks.signing", "tidings.webhooks.events"]


def sans_io_modules() -> list[str]:
    found = list(SANS_IO_MODULES)
    for package in SANS_IO_PACKAGES:
        found.append(package.__name__)
        found += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return found


def imports_trio(module: str) -> bool:
    code = f"import sys, {module}; print('trio' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout == "True\n"


def test_the_packages_are_found():
    modules = sans_io_modules()
    assert "tidings.wire.protocol" in modules and "tidings.routing.router" in modules


@pytest.mark.parametrize("module", sans_io_modules())
def test_does_not_import_trio(module):
    assert not imports_trio(module), f"importing {module} pulls in trio"


def test_the_check_can_fail():
    # the same probe on a module that does use trio says so
    assert imports_trio("tidings.server.hub")
