"""The sans-IO modules never import trio (checked in a fresh interpreter each)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

# The modules the contract names sans-IO, plus later ones whose docstring says so
# (skipped while they do not exist).
SANS_IO = ["config", "protocol", "auth", "handshake", "sessions", "router", "limits", "store", "store_sqlite",
           "log", "reload", "rooms", "http"]


@pytest.mark.parametrize("module", SANS_IO)
def test_does_not_import_trio(module):
    if importlib.util.find_spec(f"tidings.{module}") is None:
        pytest.skip(f"tidings.{module} does not exist")
    code = f"import sys, tidings.{module}; print('trio' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "False\n", f"importing tidings.{module} pulls in trio"


def test_the_check_can_fail():
    # the same probe on a module that does use trio prints True
    code = "import sys, tidings.hub; print('trio' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout == "True\n", r.stderr
