"""The dependency rules of docs/architecture.md, read from the source (AST; nothing imported).

Every import statement counts, module-level or inside a function: a lazy `import torch` in
the server is still torch in the serving process.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# folder -> the package its files belong to (pyproject.toml's package-dir)
SOURCES = {"service/mha": "mha", "model/mha/model": "mha.model", "export/mha/export": "mha.export"}
GENERATED = "mha.proto"


@dataclass(frozen=True)
class Rule:
    """Modules under `scope` may not import anything under one of `forbidden`."""

    scope: str
    forbidden: tuple[str, ...]
    why: str


SERVING_INSTALL = ("torch", "onnx", "onnxscript", "safetensors", "mha.model", "mha.export")
TRANSPORT = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "mha.proto")
RULES = (
    Rule("mha.service", SERVING_INSTALL, "the serving install and image carry no PyTorch"),
    Rule("mha.client", SERVING_INSTALL, "the client installs without the export extra"),
    Rule("mha.bench", SERVING_INSTALL, "`mha bench serve` runs on the serving install"),
    Rule("mha.cli", SERVING_INSTALL, "the dispatcher imports subcommands by name only"),
    Rule("mha.service.core", (*TRANSPORT, "mha.service.grpc", "mha.client", "mha.bench"),
         "the core is transport-free"),
    Rule("mha.service.grpc", ("mha.client", "mha.bench"), "the server does not use its clients"),
    Rule("mha.service.core", ("mha.service.frontends",), "the core knows no processes"),
    *(Rule(f"mha.service.frontends.{name}", (*TRANSPORT, "mha.service.grpc", "mha.client"),
           "the engine and the supervisor carry no protocol (the supervisor forks before "
           "gRPC is imported)")
      for name in ("engine", "supervisor", "link", "arena", "messages")),
    Rule("mha.client", ("mha.service.core", "mha.service.grpc.server",
                        "mha.service.grpc.servicer", "mha.service.grpc.messages", "mha.bench"),
         "the client reads only the wire codec and the tensor contract"),
    Rule("mha.export", ("mha.service", "mha.client", "mha.bench", "mha.cli"),
         "export depends on model/ and the shared leaf modules only"),
    Rule("mha.model", ("mha.export", "mha.service", "mha.client", "mha.bench", "mha.cli"),
         "the model depends on nothing of the project"),
    Rule("mha", ("transformers",), "transformers is a test dependency only (tests/hf)"),
    Rule("mha.service", ("tokenizers",), "tokenizing is the client's optional `text` extra"),
)  # fmt: skip
# import nothing of the project
LEAVES = ("mha.contract", "mha.errors", "mha.tables", "mha.checkpoint_files")


def module_name(path: Path, folder: Path, package: str) -> str:
    parts = list(path.relative_to(folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def modules() -> dict[str, Path]:
    """Every project module (generated code excluded) -> its file."""
    found = {}
    for folder, package in SOURCES.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            name = module_name(path, base, package)
            if not under(name, GENERATED):
                found[name] = path
    return found


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            # `from mha.service import core` imports mha.service.core
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            found.append((node.lineno, base))
    return found


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def violations(found: dict[str, Path]) -> list[str]:
    problems = []
    for module, path in found.items():
        for line, target in imports(path, module):
            for rule in RULES:
                hit = next((f for f in rule.forbidden if under(target, f)), None)
                if under(module, rule.scope) and hit:
                    where = f"{shown(path)}:{line}"
                    problems.append(f"{where}: {module} imports {target} ({rule.why})")
            if module in LEAVES and under(target, "mha"):
                problems.append(f"{shown(path)}:{line}: leaf {module} imports {target}")
    return sorted(set(problems))


def test_the_project_keeps_its_import_directions() -> None:
    found = modules()
    expected = {"mha.service.core.dataplane", "mha.service.grpc.servicer", "mha.client.core",
                "mha.bench.scenarios.serve", "mha.export.exporter",
                "mha.service.frontends.engine", "mha.service.frontends.supervisor",
                "mha.model.attention"}  # fmt: skip
    assert expected <= set(found)
    assert violations(found) == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("mha.service.core.fake", "import grpc\n", "transport-free"),
        ("mha.service.core.fake", "def f():\n    from mha.client import Client\n", "transport"),
        ("mha.service.grpc.fake", "def f():\n    import torch\n", "no PyTorch"),
        ("mha.export.fake", "from mha.service.core import errors\n", "export depends"),
        ("mha.export.fake", "from mha.cli import CliError\n", "export depends"),
        ("mha.client.fake", "from mha.service import core\n", "wire codec"),
        ("mha.service.core.fake", "from .. import grpc\n", "transport-free"),
        ("mha.contract", "from mha.service.core import errors\n", "leaf mha.contract"),
        ("mha.model.fake", "def f():\n    import transformers\n", "test dependency only"),
        ("mha.client.fake", "from transformers import AutoModel\n", "test dependency only"),
        ("mha.service.core.fake", "import tokenizers\n", "optional `text` extra"),
    ],
)
def test_a_breach_is_reported(tmp_path: Path, module: str, source: str, expected: str) -> None:
    path = tmp_path / "fake.py"
    path.write_text(source)
    problems = violations({module: path})
    assert any(expected in p for p in problems), problems


def test_allowed_imports_pass(tmp_path: Path) -> None:
    path = tmp_path / "fake.py"
    path.write_text("import numpy\nfrom mha import contract\nfrom mha.service.grpc import codec\n")
    assert violations({"mha.client.fake": path}) == []
