"""The package's rooms import one way: bytes (storage_backends) <- tiers / checkpoint <- prefetch /
retrieval <- runtime <- apps <- benchmarks. Any import of a higher room from a lower one, at
module level or inside a function, fails here with the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
LEVEL = {"errors": 0, "_native": 0, "storage_backends": 1, "tiers": 2, "checkpoint": 2, "prefetch": 3,
         "retrieval": 3, "runtime": 4, "apps": 5, "benchmarks": 6}


def test_imports_go_one_way():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        room = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if room not in LEVEL:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(rel))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "flashtier" and len(parts) > 1 and LEVEL.get(parts[1], -1) > LEVEL[room]:
                    bad.append(f"{rel}:{node.lineno}: {room} imports {name}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)
