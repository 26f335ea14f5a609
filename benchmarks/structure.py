"""The package's structure in numbers: modules per folder, import cycles, the import chains of the
evaluation entry point and the function-local imports.

    python benchmarks/structure.py [--out benchmarks/results/structure.json] [--entry
    scripts/translation_FPDM.py]

The import graph is grimp's (import-linter's library): it counts every import statement, those inside
functions included, so a cycle hidden behind a function-local import is still a cycle here. The longest
chain is the longest simple path of guided_diffusion imports that starts at a module the entry script
imports (searched exhaustively, with a step budget; the JSON says when the budget ran out).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
from collections import Counter
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "guided_diffusion"
SEARCH_BUDGET = 2_000_000


def modules_per_folder(root: Path) -> dict[str, int]:
    """Python modules (``__init__.py`` not counted) per folder of the package."""
    counts: Counter[str] = Counter()
    for path in root.rglob("*.py"):
        if path.name != "__init__.py":
            counts[str(path.parent.relative_to(root.parent))] += 1
    return dict(sorted(counts.items()))


def _local_imports(tree: ast.AST) -> list[ast.stmt]:
    found: list[ast.stmt] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child, inside)

    visit(tree, False)
    return found


def _is_internal(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == PACKAGE
    return any(a.name.split(".")[0] == PACKAGE for a in node.names)


def function_local_imports(root: Path) -> dict:
    """Import statements inside function bodies of the package: total, of the package's own modules
    (``internal``), of other libraries (``external``, by top-level name) and the modules holding them."""
    internal, external, modules = 0, Counter(), set()
    for path in sorted(root.rglob("*.py")):
        nodes = _local_imports(ast.parse(path.read_text(encoding="utf-8")))
        for node in nodes:
            modules.add(str(path.relative_to(root.parent)))
            if _is_internal(node):
                internal += 1
            else:
                name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                external[name.split(".")[0]] += 1
    return {"total": internal + sum(external.values()), "internal": internal,
            "external": dict(sorted(external.items())), "modules": len(modules)}


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return sorted(out)


def entry_modules(graph: grimp.ImportGraph, script: Path) -> list[str]:
    """The package modules a script imports at its top level."""
    names = set()
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in graph.modules else node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
    return sorted(n for n in names if n in graph.modules)


def longest_chain(graph: grimp.ImportGraph, starts: list[str]) -> tuple[list[str], bool]:
    """The longest simple path of imports from one of ``starts`` (exhaustive DFS within SEARCH_BUDGET
    steps); returns the path and whether the search finished."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    best: list[str] = []
    steps = 0
    for start in starts:
        path, seen = [start], {start}
        work = [iter(edges[start])]
        while work:
            steps += 1
            if steps > SEARCH_BUDGET:
                return best, False
            nxt = next(work[-1], None)
            if nxt is None:
                work.pop()
                seen.discard(path.pop())
                continue
            if nxt in seen:
                continue
            path.append(nxt)
            seen.add(nxt)
            work.append(iter(edges[nxt]))
            if len(path) > len(best):
                best = list(path)
    return best, True


def measure(entry: Path) -> dict:
    graph = grimp.build_graph(PACKAGE, include_external_packages=False)
    starts = entry_modules(graph, entry)
    reach = set()
    for s in starts:
        reach |= graph.find_upstream_modules(s) | {s}
    shortest = {}
    for target in sorted(reach):
        chains = [c for s in starts if s != target and (c := graph.find_shortest_chain(
            importer=s, imported=target, as_packages=False))]
        if chains:
            shortest[target] = min(chains, key=len)
    deepest = max(shortest.values(), key=len) if shortest else []
    chain, complete = longest_chain(graph, starts)
    root = REPO / PACKAGE
    folders = modules_per_folder(root)
    return {
        "modules_per_folder": folders,
        "modules": sum(folders.values()),
        "import_cycles": cycles(graph),
        "entry": str(entry.relative_to(REPO)),
        "entry_modules": starts,
        "modules_reached_from_entry": len(reach),
        "deepest_shortest_chain": deepest,
        "longest_chain": chain,
        "longest_chain_search_complete": complete,
        "function_local_imports": function_local_imports(root),
    }


def table(r: dict) -> str:
    lines = ["folder                         modules"]
    lines += [f"  {k:<28} {v:>5}" for k, v in r["modules_per_folder"].items()]
    local = r["function_local_imports"]
    lines += [
        f"modules in all                 {r['modules']:>5}",
        f"import cycles (SCCs)           {len(r['import_cycles']):>5}  "
        + "; ".join(" <-> ".join(m.removeprefix(PACKAGE + ".") for m in c) for c in r["import_cycles"]),
        f"modules reached from entry     {r['modules_reached_from_entry']:>5}  ({r['entry']})",
        f"deepest shortest chain         {len(r['deepest_shortest_chain']):>5}  modules",
        f"longest import chain           {len(r['longest_chain']):>5}  modules"
        + ("" if r["longest_chain_search_complete"] else " (search budget ran out: a lower bound)"),
        "    " + " -> ".join(m.removeprefix(PACKAGE + ".") for m in r["longest_chain"]),
        f"function-local imports         {local['total']:>5}  (package {local['internal']}, "
        f"other {sum(local['external'].values())}, in {local['modules']} modules)",
        f"    other libraries: {local['external']}",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "structure.json"))
    p.add_argument("--entry", default=str(REPO / "scripts" / "translation_FPDM.py"))
    args = p.parse_args()
    result = measure(Path(args.entry).resolve())
    print(table(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
