"""Structural figures of a kiln source tree, for before -> after notes on a restructure.

Reads only the installed source: the packages pyproject.toml lists, found through its
`package-dir` mapping (so bench/ and tests/ never count). Prints, one per line:
  * KV layout names: "static"/"concat" string literals and the comparisons that use them,
    outside kiln/layouts.py;
  * ONNX Runtime step paths: call sites of `<session>.run(...)` and `.run_with_iobinding(...)`;
  * precision declarations: tuple/list/set/dict literals holding two or more precision names;
  * lines of the three stage entry points (export_model, optimize_model, build_engine; the
    function itself, not the helpers it calls);
  * installed lines of benchmark code (files named bench*, gpu_check, load, stall);
  * the longest function.
Lines are counted with ast (first line of the `def` to its last line, docstring included).

usage: python -m bench.code_metrics [--root DIR] [--details]
"""

from __future__ import annotations

import argparse
import ast
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

LAYOUT_NAMES = frozenset({"static", "concat"})
LAYOUT_MODULE = "kiln/layouts.py"
PRECISION_NAMES = frozenset({"fp32", "fp16", "bf16", "fp8", "int8", "int4"})
BENCH_FILE = re.compile(r"^(bench.*|gpu_check|load|stall)\.py$")
ENTRY_POINTS = (
    ("kiln.export", "export_model"),
    ("kiln.optimize", "optimize_model"),
    ("kiln.engine", "build_engine"),
)


@dataclass(frozen=True)
class Source:
    """One installed Python file: its path relative to the root, module name and syntax tree."""

    rel: str
    module: str
    tree: ast.Module
    lines: int


def package_dirs(root: Path) -> dict[str, Path]:
    """Installed package name -> its folder, from pyproject.toml's setuptools settings."""
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = tool.get("package-dir", {})
    packages = tool.get("packages")
    if not isinstance(packages, list):
        raise SystemExit(f"{root}/pyproject.toml: [tool.setuptools] packages is not a list")
    dirs = {}
    for pkg in packages:
        parent = max((p for p in mapping if pkg == p or pkg.startswith(p + ".")), key=len)
        tail = pkg[len(parent) :].lstrip(".").replace(".", "/")
        dirs[pkg] = root / mapping[parent] / tail
    return dirs


def installed_sources(root: Path) -> list[Source]:
    """Every .py file of every installed package (one level per package, as setuptools does)."""
    out = []
    for pkg, folder in sorted(package_dirs(root).items()):
        for path in sorted(folder.glob("*.py")):
            text = path.read_text()
            module = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            rel = str(path.relative_to(root))
            out.append(Source(rel, module, ast.parse(text, rel), len(text.splitlines())))
    return out


def _is_layout_name(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value in LAYOUT_NAMES


def layout_names(sources: list[Source]) -> tuple[dict[str, int], dict[str, int]]:
    """(literals per file, comparisons per file) of KV layout names outside the layout module."""
    literals: dict[str, int] = {}
    compares: dict[str, int] = {}
    for src in sources:
        if src.rel == LAYOUT_MODULE:
            continue
        n_lit = sum(_is_layout_name(n) for n in ast.walk(src.tree))
        n_cmp = 0
        for node in ast.walk(src.tree):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                elts = [e for s in sides if isinstance(s, ast.Tuple | ast.List | ast.Set)
                        for e in s.elts]  # fmt: skip
                n_cmp += any(_is_layout_name(s) for s in [*sides, *elts])
        if n_lit:
            literals[src.rel] = n_lit
        if n_cmp:
            compares[src.rel] = n_cmp
    return literals, compares


def ort_step_calls(sources: list[Source]) -> dict[str, list[int]]:
    """Lines per file of ONNX Runtime session runs (`sess.run(...)`, `.run_with_iobinding`)."""
    found: dict[str, list[int]] = {}
    for src in sources:
        for node in ast.walk(src.tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name, owner = node.func.attr, ast.unparse(node.func.value).lower()
            ort_run = name == "run" and (
                "sess" in owner
                or (
                    node.args
                    and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value is None
                )
            )
            if name == "run_with_iobinding" or ort_run:
                found.setdefault(src.rel, []).append(node.lineno)
    return found


def precision_declarations(sources: list[Source]) -> dict[str, list[int]]:
    """Lines per file of collection literals that name two or more precisions."""
    found: dict[str, list[int]] = {}
    for src in sources:
        for node in ast.walk(src.tree):
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                items = node.elts
            elif isinstance(node, ast.Dict):
                items = [k for k in node.keys if k is not None]
            else:
                continue
            names = {e.value for e in items if isinstance(e, ast.Constant)} & PRECISION_NAMES
            if len(names) >= 2:
                found.setdefault(src.rel, []).append(node.lineno)
    return found


def _functions(tree: ast.AST) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function in `tree` with its dotted name (Class.method, outer.inner)."""
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out.append((name, child))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def _length(fn: ast.AST) -> int:
    return fn.end_lineno - fn.lineno + 1  # type: ignore[attr-defined]


def entry_point_lines(sources: list[Source]) -> list[tuple[str, str, int]]:
    """(function, file, lines) of each stage entry point, following a re-export once."""
    by_module = {s.module: s for s in sources}
    out = []
    for module, name in ENTRY_POINTS:
        src = by_module.get(module)
        where = src
        if src is not None and not any(n == name for n, _ in _functions(src.tree)):
            where = None
            for node in src.tree.body:
                if isinstance(node, ast.ImportFrom) and any(a.name == name for a in node.names):
                    where = by_module.get(node.module or "")
        fn = next((f for n, f in _functions(where.tree) if n == name), None) if where else None
        out.append((name, where.rel if where else "?", _length(fn) if fn else 0))
    return out


def bench_lines(sources: list[Source]) -> dict[str, int]:
    """Lines of installed files that are benchmark or check tools, by name."""
    return {s.rel: s.lines for s in sources if BENCH_FILE.match(Path(s.rel).name)}


def longest_function(sources: list[Source]) -> tuple[str, str, int]:
    """(dotted name, file, lines) of the longest function in the installed source."""
    return max(
        ((name, s.rel, _length(fn)) for s in sources for name, fn in _functions(s.tree)),
        key=lambda t: t[2],
    )


def _per_file(counts: dict[str, int] | dict[str, list[int]]) -> str:
    parts = []
    for rel, v in sorted(counts.items()):
        parts.append(f"{rel} {v if isinstance(v, int) else ','.join(map(str, sorted(v)))}")
    return "\n".join(f"    {p}" for p in parts)


def main(argv: list[str] | None = None) -> int:
    """Print the figures for the tree at --root."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    p.add_argument("--details", action="store_true", help="list the files (and lines) counted")
    args = p.parse_args(argv)
    sources = installed_sources(args.root)
    total = sum(s.lines for s in sources)
    print(f"tree: {args.root} ({len(sources)} installed files, {total} lines)")

    literals, compares = layout_names(sources)
    print(f"KV layout name literals outside {LAYOUT_MODULE}: {sum(literals.values())} "
          f"in {len(literals)} files; comparisons using them: {sum(compares.values())} "
          f"in {len(compares)} files")  # fmt: skip
    if args.details:
        print(f"  literals:\n{_per_file(literals)}\n  comparisons:\n{_per_file(compares)}")

    steps = ort_step_calls(sources)
    print(f"ONNX Runtime session run call sites: {sum(map(len, steps.values()))} "
          f"in {len(steps)} files")  # fmt: skip
    if args.details:
        print(_per_file(steps))

    precisions = precision_declarations(sources)
    print(f"precision-name literals (>= 2 names): {sum(map(len, precisions.values()))} "
          f"in {len(precisions)} files")  # fmt: skip
    if args.details:
        print(_per_file(precisions))

    entries = entry_point_lines(sources)
    print("stage entry points: " + ", ".join(f"{n} {k} lines ({f})" for n, f, k in entries))

    bench = bench_lines(sources)
    print(f"installed lines of benchmark code: {sum(bench.values())} in {len(bench)} files")
    if args.details and bench:
        print(_per_file(bench))

    name, rel, n = longest_function(sources)
    print(f"longest function: {name} ({rel}), {n} lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
