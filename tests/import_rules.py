"""A custom import-linter contract: no module imports another module's private (``_name``) names.

import-linter's own ``private_modules`` contract covers private *modules*; this one covers names
(``from data_processing.sources import _always``), which grimp's graph does not carry, so it reads
each module's ``from ... import`` statements with ``ast`` (multi-line imports and imports inside
functions included). Registered in pyproject.toml's ``[tool.importlinter]`` as ``private_names``.
"""

from __future__ import annotations

import ast
import importlib.util

from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def _source(module: str) -> str | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def private_name_imports(module: str, roots: set[str]) -> list[tuple[int, str, str]]:
    """``(line, imported module, name)`` for every private name ``module`` imports from another
    project module (one under ``roots``)."""
    text = _source(module)
    if text is None:
        return []
    spec = importlib.util.find_spec(module)
    is_package = bool(spec and spec.submodule_search_locations)
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.ImportFrom):
            continue
        target = _absolute(module, node, is_package)
        if target.split(".")[0] not in roots or target == module:
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append((node.lineno, target, alias.name))
    return found


class PrivateNamesContract(Contract):
    """Modules of ``packages`` import no ``_private`` name from another project module."""

    type_name = "private_names"
    packages = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        roots = {p.split(".")[0] for p in self.packages}  # type: ignore[attr-defined]
        violations = []
        for module in sorted(graph.modules):
            if any(module == p or module.startswith(p + ".") for p in self.packages):  # type: ignore[attr-defined]
                violations += [(module, *v) for v in private_name_imports(module, roots)]
        return ContractCheck(kept=not violations, metadata={"violations": violations})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for module, line, target, name in check.metadata["violations"]:
            output.print_error(f"{module}:{line} imports the private name {name} of {target}")
            output.new_line()
