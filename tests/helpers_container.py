"""The container engine for tests that build or run images: scripts/container.py loaded as a
module, and the `container_engine` fixture (a test module that uses it imports it from here).

The fixture gives the module a docker engine (a `dockerd` started for the module is stopped
after it) with the local Debian base image made or confirmed; where none can be had (no
docker.io, not root) the test fails unless DEFECTFLOW_ALLOW_MISSING allows `container`
(tests/helpers_resources.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys

import pytest
from helpers_processes import REPO_ROOT
from helpers_resources import skip_missing


def load_script(name: str):
    """scripts/<name>.py as the module defectflow_<name> (once)."""
    module_name = f"defectflow_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


container = load_script("container")


@pytest.fixture(scope="module")
def container_engine(tmp_path_factory):
    """The engine for the module (dockerd started here is stopped after it) and the base image.
    Modules that use it take turns (scripts/container.py's session lock); `make test` runs them
    all on one xdist worker (tests/helpers_schedule.py.CONTAINER_FILES), so none waits."""
    with contextlib.ExitStack() as stack:
        try:
            engine = stack.enter_context(
                container.engine(tmp_path_factory.mktemp("engine"), lock_timeout=2400)
            )
            base = container.ensure_base_image(engine, container.bentofile_base_image())
        except container.EngineUnavailable as exc:
            skip_missing("container", str(exc))
        print(
            f"\nbase image {base['size'] / 1e6:.0f} MB ({'built' if base['built'] else 'reused'})"
        )
        yield engine


def train_image(docker, log_dir) -> str:
    """The training image of this checkout, built for the session when missing or older than
    the code (its label records the source digest)."""
    digest = container.train_source_digest()
    image = container.train_image_tag()
    have = (
        docker.out(
            "image",
            "inspect",
            "--format",
            f'{{{{ index .Config.Labels "{container.LABEL}.source" }}}}',
            image,
        )
        if docker.image_exists(image)
        else None
    )
    if have != digest:
        figures = container.build_train_image(docker, log_file=log_dir / "train-image.log")
        print(
            f"\ntraining image {image}: {figures['size'] / 1e6:.0f} MB in {figures['seconds']:.0f} s"
        )
    return image
