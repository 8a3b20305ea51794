"""The layering docs/architecture.md draws, checked on the source: the documented layer order, no import
circles, imports at module top, the maths and the formats free of Ray, the report below the stages."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "forgetting_ray"
ARCHITECTURE_DOC = REPO / "docs" / "architecture.md"
# The CLI dispatches to heavy commands (Ray, torch, DeepSpeed) only when one is called, so that
# `forgetting-ray config` or `plan` answer at once: its lazy imports are the one exception.
LAZY_ALLOWED = {"forgetting_ray.cli"}
RAY_FREE = ("forgetting_ray.config", "forgetting_ray.constants", "forgetting_ray.errors", "forgetting_ray.losses",
            "forgetting_ray.selection", "forgetting_ray.scoring", "forgetting_ray.search", "forgetting_ray.store",
            "forgetting_ray.data", "forgetting_ray.report", "forgetting_ray.eval.base", "forgetting_ray.eval.metrics",
            "forgetting_ray.exports", "forgetting_ray.faults", "forgetting_ray.train.data_plan",
            "forgetting_ray.train.guardrail")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def imported_modules(node: ast.AST, mod: str, is_pkg: bool) -> list[str]:
    """The modules an import statement loads (``from . import x`` names the submodule x, not the package)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level == 0:
        base = node.module or ""
    else:
        parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    subs = [f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}")]
    return subs if len(subs) == len(node.names) else [base, *subs]


def scan() -> dict[str, dict[str, list[str]]]:
    """module -> {"top": modules imported at module level, "inner": imported inside functions}."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        mod, tree = module_name(path), ast.parse(path.read_text(encoding="utf-8"))
        is_pkg = path.name == "__init__.py"
        inner_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        entry = out.setdefault(mod, {"top": [], "inner": []})
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                entry["inner" if id(node) in inner_nodes else "top"] += imported_modules(node, mod, is_pkg)
    return out


def test_no_import_circle_among_the_package_modules():
    graph = {m: {t for t in e["top"] if t.startswith("forgetting_ray") and t != m} for m, e in scan().items()}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                circles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles


def test_package_imports_sit_at_module_top():
    lazy = {m: sorted({t for t in e["inner"] if t.startswith("forgetting_ray")}) for m, e in scan().items()
            if m not in LAZY_ALLOWED}
    assert {m: ts for m, ts in lazy.items() if ts} == {}


def test_maths_formats_and_report_do_not_touch_ray_or_the_stages():
    offenders = []
    for mod, e in scan().items():
        imports = e["top"] + e["inner"]
        if mod.startswith(RAY_FREE):  # neither Ray itself nor the package's Ray glue
            offenders += [f"{mod} -> {t}" for t in imports if t == "ray" or t.startswith(("ray.", "forgetting_ray.cluster"))]
        if mod.startswith(("forgetting_ray.report", "forgetting_ray.data", "forgetting_ray.eval", "forgetting_ray.exports")):
            offenders += [f"{mod} -> {t}" for t in imports if t.startswith("forgetting_ray.stages")]
        if mod == "forgetting_ray.config" or mod.startswith("forgetting_ray.config."):
            offenders += [f"{mod} -> {t}" for t in imports if t.startswith("forgetting_ray")
                          and t != "forgetting_ray.errors" and not t.startswith("forgetting_ray.config.")]
    assert not offenders


def test_the_product_does_not_import_the_studies():
    offenders = []
    for mod, e in scan().items():
        if not mod.startswith("forgetting_ray.studies"):  # the CLI may dispatch to a study when it is called
            imports = e["top"] + ([] if mod in LAZY_ALLOWED else e["inner"])
            offenders += [f"{mod} -> {t}" for t in imports if t.startswith("forgetting_ray.studies")]
        else:  # the study reads the stage outputs itself, not through the audit page's renderer
            offenders += [f"{mod} -> {t}" for t in e["top"] + e["inner"] if t.startswith("forgetting_ray.report.html")]
    assert not offenders


def documented_layers() -> dict[str, int]:
    """module or package prefix -> its layer, read from the numbered list of docs/architecture.md's
    "## Layers" section (every backticked path there; those outside the package, e.g. `jobs/`, are skipped)."""
    text = ARCHITECTURE_DOC.read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for number, body in re.findall(r"^(\d)\. (.*?)(?=^\d\. |\Z)", section, flags=re.M | re.S):
        for path in re.findall(r"`([\w/]+(?:\.py|/))`", body):
            if (REPO / path).exists() and not (PACKAGE / path).exists():
                continue  # jobs/, bench/: outside the package
            assert (PACKAGE / path).exists(), f"docs/architecture.md names {path}, which is not in the package"
            name = ".".join(["forgetting_ray", *Path(path.removesuffix(".py")).parts])
            assert layers.get(name, int(number)) == int(number), f"{path} is drawn in two layers"
            layers[name] = int(number)
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 1, -1):  # the longest documented path that names it
        if ".".join(parts[:n]) in layers:
            return layers[".".join(parts[:n])]
    return None


def test_every_module_has_a_documented_layer_and_imports_point_down():
    layers = documented_layers()
    assert len(set(layers.values())) == 6, layers
    graph = scan()
    modules = [m for m in graph if m != "forgetting_ray"]
    assert [m for m in modules if layer_of(m, layers) is None] == []
    upward = [f"{m} (layer {layer_of(m, layers)}) -> {t} (layer {layer_of(t, layers)})"
              for m in modules for t in graph[m]["top"] + graph[m]["inner"]
              if t.startswith("forgetting_ray.") and layer_of(t, layers) > layer_of(m, layers)]
    assert upward == []
