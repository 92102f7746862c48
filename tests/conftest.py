"""Shared fixtures: tiny random models saved once per session, and the bundled SmolLM2 GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import ALL_CONFIGS, make_tiny_model


def _shared_data() -> Path:
    """The team's shared/data folder: beside the checkout (../shared), or the workplace's /work/shared."""
    candidates = [parent / "shared" / "data" for parent in Path(__file__).resolve().parents]
    return next((c for c in [*candidates, Path("/work/shared/data")] if c.is_dir()), candidates[1])


SHARED_DATA = _shared_data()
PYTHIA_TOKENIZER = SHARED_DATA / "pythia-20B_tokenizer.json"


@pytest.fixture(scope="session", params=sorted(ALL_CONFIGS))
def tiny_model(request, tmp_path_factory):
    """(directory, transformers reference model) for each tiny config."""
    directory = tmp_path_factory.mktemp(request.param)
    return directory, make_tiny_model(ALL_CONFIGS[request.param], directory)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from lmserve.weights.resolve import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")
