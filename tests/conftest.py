import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    """One export folder per session for the torchvision zoo tier (files are cached by name in it)."""
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    return tmp_path_factory.mktemp("torchvision_zoo")
