import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from profile_helpers import MODEL_A, MODEL_B, write_model  # noqa: E402


@pytest.fixture
def models(tmp_path: Path) -> tuple[str, str]:
    return write_model(tmp_path, "model-a", MODEL_A), write_model(tmp_path, "model-b", MODEL_B)
