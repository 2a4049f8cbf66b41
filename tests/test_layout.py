"""The package's shape is a rule, not a habit: checked here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mesh_inference"
# What a sans-I/O core must not touch: the event loop, sockets, clocks, threads.
FORBIDDEN_IN_CORE = {"asyncio", "socket", "time", "threading", "selectors", "aiohttp", "datetime"}
# The one exception: a certificate's validity dates come from the clock (core/identity.py).
ALLOWED = {("identity.py", "datetime")}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", sorted(p.name for p in (PACKAGE / "core").glob("*.py")))
def test_core_modules_do_no_io(module: str) -> None:
    bad = {
        name
        for name in imported_modules(PACKAGE / "core" / module) & FORBIDDEN_IN_CORE
        if (module, name) not in ALLOWED
    }
    assert not bad, f"core/{module} imports {sorted(bad)}"


def test_no_private_attribute_of_aioquic_is_read() -> None:
    # The attributes the old endpoint read, and aioquic's private modules.
    private = re.compile(
        r"aioquic\._|_peer_certificate|_rtt_smoothed|_network_paths|_close_event|"
        r"sender\._buffer|(?<!self)\._quic\b|\._loss\b|_quic\._streams\b"
    )
    for path in PACKAGE.rglob("*.py"):
        found = private.search(path.read_text())
        assert found is None, f"{path.relative_to(PACKAGE)} reads {found.group(0)}"


def test_the_design_picture_lists_every_module() -> None:
    """DESIGN.md opens with the picture of ``ls mesh_inference``: it may not drift."""
    design = (PACKAGE.parent / "DESIGN.md").read_text()
    picture = design.split("```", 2)[1]
    listed = set(re.findall(r"[\w.]+\.(?:py|json)\b", picture))
    actual = {p.name for p in PACKAGE.rglob("*") if p.suffix in (".py", ".json")
              and "__pycache__" not in p.parts and p.name != "__init__.py"}
    assert actual - listed == set(), "modules missing from DESIGN.md's picture"
    assert listed - actual - {"__init__.py"} == set(), "DESIGN.md lists modules that are gone"
