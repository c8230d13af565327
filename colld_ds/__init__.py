"""CoLLD on DeepSpeed. Its sub-packages ``colld_ds.kernels`` and ``colld_ds.data_prep`` are the
repository's top-level ``kernels/`` and ``data_prep/`` folders, which pyproject.toml installs
under ``colld_ds`` (``package-dir``), so that colld adds no top-level import name but
``colld_ds``. Imported from a source checkout (the repository on ``sys.path``: ``PYTHONPATH``,
launch.sh, ``python -m`` in it, with or without an install), ``colld_ds`` is this folder, and
``_CheckoutFinder`` maps the two names to those folders the same way."""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

FOLDERS = {"colld_ds.kernels": "kernels", "colld_ds.data_prep": "data_prep"}  # package: folder
_REPOSITORY = Path(__file__).resolve().parent.parent


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """``colld_ds.kernels`` / ``colld_ds.data_prep`` -> this checkout's ``kernels/`` /
    ``data_prep/``; first on ``sys.meta_path``, so that an install of another checkout (its
    editable finder maps the same names) cannot mix its folders with this ``colld_ds``."""

    def find_spec(self, name, path=None, target=None):
        if name not in FOLDERS:
            return None
        init = _REPOSITORY / FOLDERS[name] / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(init.parent)])


if (_REPOSITORY / "pyproject.toml").is_file() and not any(
        isinstance(finder, _CheckoutFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _CheckoutFinder())
