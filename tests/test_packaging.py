"""colld installs one top-level import package, ``colld_ds``: the repository's ``kernels/`` and
``data_prep/`` folders are ``colld_ds.kernels`` and ``colld_ds.data_prep`` (pyproject.toml's
``package-dir``; ``colld_ds.FOLDERS`` in a checkout), since ``kernels`` is also Hugging Face's
package and ``data_prep`` a generic name. Nothing in the repository may use the bare names."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import colld_ds

REPO = Path(__file__).resolve().parent.parent
BARE = ("kernels", "data_prep")
# a dotted module path that starts with a bare name (a `-m` target, a monkeypatch string, prose)
BARE_DOTTED = re.compile(r"(?<![\w./-])(kernels|data_prep)\.[A-Za-z_]")


def tracked(*patterns: str) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z", "--", *patterns], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    return [REPO / name for name in listed.split("\0") if name and (REPO / name).is_file()]


def bare_imports(path: Path) -> list[str]:
    """``file:line: module`` for each absolute import of a bare ``kernels`` / ``data_prep``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {name}" for name in names
                  if name.split(".")[0] in BARE]
    return found


def test_no_module_imports_a_bare_kernels_or_data_prep():
    sources = tracked("*.py")
    assert sources, "git ls-files listed no .py file"
    found = [line for path in sources for line in bare_imports(path)]
    assert not found, "import colld_ds.kernels / colld_ds.data_prep instead:\n" + "\n".join(found)


def test_no_file_names_a_bare_module_path():
    """Module paths in strings, commands and docs (`-m`, monkeypatch targets, prose)."""
    files = tracked("*.py", "*.sh", "*.md", "*.toml", "launch.sh", ".ci/run")
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}" for path in files
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if BARE_DOTTED.search(line)]
    assert not found, "name colld_ds.kernels... / colld_ds.data_prep...:\n" + "\n".join(found)


def test_pyproject_installs_the_folders_under_colld_ds():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == colld_ds.FOLDERS == {
        "colld_ds.kernels": "kernels", "colld_ds.data_prep": "data_prep"}
    folders = {"colld_ds": "colld_ds", **colld_ds.FOLDERS}
    on_disk = {".".join((package, *init.parent.relative_to(REPO / folder).parts))
               for package, folder in folders.items()
               for init in (REPO / folder).rglob("__init__.py")}
    assert sorted(setuptools["packages"]) == sorted(on_disk), "list every package in pyproject"
    assert {name.split(".")[0] for name in setuptools["packages"]} == {"colld_ds"}


def sub_packages(cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """A fresh process that prints the ``colld_ds``, ``colld_ds.kernels`` and
    ``colld_ds.data_prep.whisper`` files, then where a bare ``kernels`` and ``data_prep`` would
    import from (``None``: nowhere)."""
    code = ("import importlib.util, colld_ds, colld_ds.kernels, colld_ds.data_prep.whisper as w\n"
            "print(colld_ds.__file__, colld_ds.kernels.__file__, w.__file__, sep='\\n')\n"
            "for bare in ('kernels', 'data_prep'):\n"
            "    print(getattr(importlib.util.find_spec(bare), 'origin', None))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_checkout_maps_the_folders(tmp_path):
    """The checkout on PYTHONPATH, run from elsewhere (launch.sh, the GPU suite): its folders."""
    result = sub_packages(tmp_path, {**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    expected = ["colld_ds/__init__.py", "kernels/__init__.py", "data_prep/whisper/__init__.py"]
    assert result.stdout.splitlines()[:3] == [str(REPO / name) for name in expected]


def test_the_install_exposes_no_bare_name(tmp_path):
    """colld as installed in this environment (editable by scripts/setup.sh, or a wheel), run from
    elsewhere: the sub-packages import, and a bare ``kernels`` / ``data_prep`` is not colld's."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = sub_packages(tmp_path, env)
    if "No module named 'colld_ds'" in result.stderr:
        pytest.skip("colld is not installed in this environment (scripts/setup.sh installs it)")
    assert result.returncode == 0, result.stderr
    package, kernels, whisper, *bare = result.stdout.splitlines()
    home = Path(package).parent                 # a wheel: the folders are in colld_ds/
    if (home.parent / "pyproject.toml").is_file():
        home = home.parent                      # editable: beside colld_ds/ in its checkout
    assert [kernels, whisper] == [str(home / "kernels/__init__.py"),
                                  str(home / "data_prep/whisper/__init__.py")]
    ours = (str(home / "kernels/__init__.py"), str(home / "data_prep/__init__.py"))
    assert not [origin for origin in bare if origin in ours], bare


def test_a_bare_kernels_import_from_the_checkout_gets_the_installed_package(tmp_path):
    """transformers (>= 5.25) imports Hugging Face's ``kernels``; with the checkout on
    ``sys.path`` (launch.sh, ``python -m`` in it) ``kernels/`` shadows it and hands over."""
    installed = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m; print(m.version('kernels'))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    if installed.returncode != 0:
        pytest.skip("Hugging Face's kernels package is not installed here")
    code = ("import transformers.activations, colld_ds.kernels as ours\n"
            "import kernels as bare\n"
            "print(bare.__file__, ours.__file__, sep='\\n')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    bare, ours = result.stdout.splitlines()[-2:]
    assert ours == str(REPO / "kernels/__init__.py")
    assert bare != ours
