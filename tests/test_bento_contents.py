"""The Bento carries exactly what serving imports, and serving imports only what the Bento installs.

Static checks over the import graph (grimp, the engine of import-linter; lazy imports inside
functions count): the modules `service.py` reaches, directly or not, are exactly the files
bentofile.yaml includes; every third-party package they import is installed in the Bento (its
`python.packages`, BentoML, and what those depend on); nothing in `defectflow` imports in a
circle. tests/test_bento_isolated.py then serves a built Bento with nothing else on the path.
"""

from __future__ import annotations

import ast
import glob
import importlib.metadata as metadata
import re
import sys

import grimp
import pytest
import yaml
from helpers_processes import REPO_ROOT

SRC = REPO_ROOT / "src"
BENTOFILE = yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("defectflow", include_external_packages=True, cache_dir=None)


def _module_name(path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def included_modules() -> set[str]:
    """The defectflow modules the bentofile's include list puts in the Bento."""
    files = set()
    for pattern in BENTOFILE["include"]:
        files.update(
            p
            for p in map(
                REPO_ROOT.joinpath,
                glob.glob(pattern.lstrip("/"), root_dir=REPO_ROOT, recursive=True),
            )
            if p.suffix == ".py" and SRC in p.parents
        )
    return {_module_name(p) for p in files}


def test_the_include_list_takes_only_the_checkouts_own_files(tmp_path):
    """A state folder inside the checkout (`make demo`'s .defectflow/) holds earlier Bentos whose
    src/ has service.py and defectflow/ too, and BentoML builds the new Bento in a folder under
    it: matched by BentoML's own rules, the include list must take the checkout's files only
    (an unanchored `service.py` copied a Bento into itself until the path was too long)."""
    from bentoml._internal.bento.build_config import BentoPathSpec

    spec = BentoPathSpec(BENTOFILE["include"], BENTOFILE.get("exclude", []), str(tmp_path))
    own = [
        "./service.py",
        "src/defectflow/inference/anomaly_score.py",
        "src/defectflow/models/layers.py",
        "src/defectflow/serving/web/ui.html",
    ]
    elsewhere = [
        ".defectflow/bentoml/bentos/defectflow/v1/src/service.py",
        ".defectflow/bentoml/tmp/bentoml_bento_x/src/service.py",
        ".defectflow/bentoml/tmp/bentoml_bento_x/src/src/defectflow/inference/anomaly_score.py",
        "tests/service.py",
        "benchmarks/src/defectflow/inference/anomaly_score.py",
        "src/defectflow/training/train.py",
    ]
    assert [path for path in own if not spec.includes(path)] == []
    assert [path for path in elsewhere if spec.includes(path)] == []


def service_imports(internal: bool = True) -> set[str]:
    """The modules service.py imports itself (at the top or inside functions): defectflow's,
    or (internal False) the others."""
    found = set()
    for node in ast.walk(ast.parse((REPO_ROOT / "service.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if (m.split(".")[0] == "defectflow") == internal}


def serving_closure(graph) -> set[str]:
    modules = set()
    for name in service_imports():
        modules |= {name, *graph.find_upstream_modules(name)}
    internal = {m for m in modules if m.split(".")[0] == "defectflow"}
    # Importing a module imports its parent packages (their __init__) first.
    return internal | {
        ".".join(m.split(".")[:i]) for m in internal for i in range(1, m.count(".") + 1)
    }


def _requirement_name(requirement: str) -> str | None:
    if ";" in requirement and "extra ==" in requirement.split(";", 1)[1]:
        return None  # an optional extra: not installed by the plain requirement
    return re.split(r"[ ;<>=!~\[(]", requirement.strip(), maxsplit=1)[0]


def installed_import_names() -> set[str]:
    """Top-level import names of the Bento's packages, BentoML and all they require."""
    by_dist: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            by_dist.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    todo = [_requirement_name(p.split("#")[0]) for p in BENTOFILE["python"]["packages"]] + [
        "bentoml"
    ]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-") if name else None
        if not key or key in seen:
            continue
        seen.add(key)
        try:
            todo.extend(_requirement_name(r) for r in metadata.requires(name) or [])
        except metadata.PackageNotFoundError:
            continue  # e.g. tensorflow-cpu's platform-specific names
    names = set().union(*(by_dist.get(d, set()) for d in seen))
    # tensorflow-cpu installs the `tensorflow` module under another distribution name.
    return names | {"tensorflow"}


def test_the_bento_includes_exactly_the_modules_serving_imports(graph):
    closure = serving_closure(graph)
    included = included_modules()
    assert closure - included == set(), (
        f"serving imports modules the Bento leaves out: {sorted(closure - included)}"
    )
    assert included - closure == set(), (
        f"the Bento carries modules serving never imports: {sorted(included - closure)}"
    )
    # The training side really is outside.
    assert (
        not {
            "defectflow.data",
            "defectflow.training.train",
            "defectflow.training.anomaly_fitting",
            "defectflow.models.unet",
        }
        & closure
    )


def test_serving_imports_only_packages_the_bento_installs(graph):
    closure = serving_closure(graph)
    external = {
        m
        for m in closure | {e for c in closure for e in graph.find_modules_directly_imported_by(c)}
        if m.split(".")[0] != "defectflow"
    }
    external = {m.split(".")[0] for m in external | service_imports(internal=False)} - set(
        sys.stdlib_module_names
    )
    missing = external - installed_import_names()
    assert not missing, f"serving imports packages the Bento does not install: {sorted(missing)}"


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    modules = sorted(m for m in graph.modules if m.split(".")[0] == "defectflow")
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w.split(".")[0] != "defectflow":
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    return found


def test_no_module_of_defectflow_imports_itself_in_a_circle(graph):
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_a_cycle():
    class Graph:
        modules = {"defectflow.a", "defectflow.b", "defectflow.c"}
        edges = {
            "defectflow.a": {"defectflow.b"},
            "defectflow.b": {"defectflow.a"},
            "defectflow.c": {"numpy"},
        }

        def find_modules_directly_imported_by(self, module):
            return self.edges.get(module, set())

    assert _cycles(Graph()) == [["defectflow.a", "defectflow.b"]]
