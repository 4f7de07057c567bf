"""The installed package holds every module of the source tree, not only the editable checkout's.

pyproject.toml maps each source folder to its package by hand (`package-dir`): a new sub-package that is not
listed imports fine from the checkout (tests, `pip install -e`) and is missing from a wheel or a plain
`pip install .`, which is how the GPU machine installs edge-recover (bench/gpu/env_gguf.sh). That happened
once: `edge_recover.recovery.modes` was left out and every recovery run there died on import."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_source_package_is_listed_in_pyproject():
    from setuptools.config.pyprojecttoml import read_configuration  # the reader the wheel is built with (3.10 too)

    setup = read_configuration(REPO / "pyproject.toml")["tool"]["setuptools"]
    listed = {name: REPO / folder for name, folder in setup["package-dir"].items()}
    assert set(setup["packages"]) == set(listed), "`packages` and `package-dir` name different packages"
    roots = {name: folder for name, folder in listed.items() if name.count(".") <= 1}
    found = set()
    for name, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    missing = sorted(found - set(listed))
    assert not missing, f"sub-packages missing from pyproject.toml's packages / package-dir: {missing}"
    for name, folder in listed.items():
        assert (folder / "__init__.py").is_file(), f"{name} -> {folder} has no __init__.py"
