import os
import sys

import pytest

# Integration helpers live beside their tests.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "integration"))


@pytest.fixture(autouse=True, scope="session")
def _runInTemporaryDirectory(tmp_path_factory):
    """trial's mktemp() and relative paths land in a throw-away directory, not the checkout."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)
