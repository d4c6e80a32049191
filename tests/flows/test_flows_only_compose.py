"""Flows only compose tasks: no task, and no logic package's work, is defined in flows/."""

import ast
from pathlib import Path

FLOWS = Path(__file__).resolve().parents[2] / "flows"


def _decorators(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                names.append(f"{node.name}: {ast.unparse(target)}")
    return names


def test_no_task_is_defined_in_a_flow_module():
    defined = {p.name: _decorators(p) for p in sorted(FLOWS.glob("*.py"))}
    assert defined["training.py"], "the check found no decorated function at all"
    tasks = [f"{name} {d}" for name, found in defined.items() for d in found if "task" in d]
    assert not tasks, f"tasks belong in tasks/: {tasks}"
    others = [
        f"{name} {d}" for name, found in defined.items() for d in found if not d.endswith(": flow")
    ]
    assert not others, f"a flow module defines only flows: {others}"
