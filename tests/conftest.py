from pathlib import Path

import pytest

# Each area keeps its shared fixtures in tests/fixtures/<area>.py.
pytest_plugins = [f"tests.fixtures.{area}" for area in ("models", "data", "train", "eval", "slurm", "mlflow", "s3")]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def recipes() -> Path:
    return REPO / "recipes"
