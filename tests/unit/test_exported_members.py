"""The public API is what each package's ``__all__`` says, and nothing slips in by accident.

Modelled on httpx's tests/test_exported_members.py: every public name a package's namespace
holds must be listed in its ``__all__``, and every listed name must be there.
"""

from __future__ import annotations
import __future__

import importlib
import types

import pytest

import gpulane

PACKAGES = ["gpulane", "gpulane.client", "gpulane.client.resilience", "gpulane.presets",
            "gpulane.worker"]
PUBLIC_DUNDERS = {"__version__"}
"""Dunder names that are API all the same (``gpulane.__version__``)."""


def public_names(module: types.ModuleType) -> set[str]:
    """What ``dir(module)`` offers a user, decided as follows:

    * names with a leading underscore are private, except :data:`PUBLIC_DUNDERS`;
    * submodules are not counted: they turn up as attributes of their package once anything
      imports them, so whether they show depends on import order, not on the API, and they
      are reached by their dotted path (``gpulane.client.resilience``) anyway;
    * ``from __future__`` directives are not counted: ``annotations`` is a compiler flag that
      leaves a ``__future__._Feature`` object behind in the namespace.

    Everything else (classes, functions, constants, and also a ``typing`` or
    ``collections.abc`` name imported only for annotations) is public and must be in
    ``__all__``: a helper import that leaks shows up here.
    """
    names = set()
    for name in dir(module):
        if name.startswith("_") and name not in PUBLIC_DUNDERS:
            continue
        value = getattr(module, name)
        if isinstance(value, types.ModuleType | __future__._Feature):
            continue
        names.add(name)
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_dir_matches_all(package: str) -> None:
    module = importlib.import_module(package)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), f"{package}.__all__ lists a name twice"
    assert public_names(module) == set(exported)


@pytest.mark.parametrize("package", PACKAGES)
def test_all_names_exist(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        assert hasattr(module, name), f"{package}.__all__ names {name!r}, which is missing"


def test_gpulane_exports_the_clients_and_the_error_tree() -> None:
    assert {"Client", "AsyncClient", "GpulaneError", "__version__"} <= set(gpulane.__all__)


def test_exported_classes_say_they_belong_to_gpulane() -> None:
    for name in gpulane.__all__:
        member = getattr(gpulane, name)
        if isinstance(member, type):
            assert member.__module__.startswith("gpulane."), (name, member.__module__)
