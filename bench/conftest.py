"""pytest-benchmark cases live in the bench scripts themselves (``bench/bench_*.py``).

Run them with ``pytest bench -m benchmark --benchmark-enable`` (or one file). They are never part of
the default ``pytest`` run: ``testpaths`` is ``tests`` and ``addopts`` deselects ``-m benchmark``;
every item collected under ``bench/`` is marked ``benchmark`` here, so even ``pytest bench``
without ``-m benchmark`` deselects them.
"""

import pathlib
import sys

import pytest

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]


def pytest_collect_file(file_path: pathlib.Path, parent):
    # bench scripts are named bench_*.py (not test_*.py): collect them as test modules too
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and file_path.parent == _HERE:
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        if _HERE in pathlib.Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.benchmark)
