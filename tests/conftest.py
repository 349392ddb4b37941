"""Shared fixtures. `gpu`, `slow` and `docker` tests are skipped unless --run-gpu / --run-slow /
--run-docker is given."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tests never touch the Hugging Face Hub (none is reachable here): fail fast instead of retrying.
# Set before anything imports huggingface_hub, which reads these once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from tests.support import DEMO_CORPUS, SHARED  # noqa: E402 - after the environment is set


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")
    parser.addoption("--run-gpu", action="store_true", help="also run tests marked gpu")
    parser.addoption("--run-docker", action="store_true",
                     help="also run tests marked docker (build the image and smoke-test it)")


def pytest_collection_modifyitems(config, items):
    for marker, option in (("slow", "--run-slow"), ("gpu", "--run-gpu"),
                           ("docker", "--run-docker")):
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=f"{marker} test: pass {option} to run it")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_gpt2_tokenizer() -> Path:
    path = SHARED / "data" / "tokenizers" / "gpt2"
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"shared GPT-2 tokenizer not found at {path} (set PTLM_SHARED)")
    return path


@pytest.fixture(scope="session")
def machado_jsonl() -> Path:
    path = SHARED / "data" / "pt" / "machado_de_assis.jsonl"
    if not path.exists():
        pytest.skip(f"shared Machado corpus not found at {path} (set PTLM_SHARED)")
    return path


@pytest.fixture(scope="session")
def demo_docs() -> list[str]:
    return [json.loads(line)["text"] for line in DEMO_CORPUS.read_text("utf-8").splitlines()]


@pytest.fixture(scope="session")
def demo_tokenizer(tmp_path_factory, demo_docs) -> Path:
    """A real byte-level BPE trained on the shipped demo corpus (fast: well under a second)."""
    from ptlm.data import tokenizer as toks

    dest = tmp_path_factory.mktemp("demo_tok")
    toks.train_bpe(demo_docs, 1024, dest)
    return dest


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory, demo_tokenizer) -> Path:
    """The demo corpus prepared at seq_len 64 (session-scoped: tests must not modify it)."""
    from ptlm.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("demo_ds") / "data"
    prepare(PrepareConfig(sources=[str(DEMO_CORPUS)], out=out, seq_len=64,
                          tokenizer=str(demo_tokenizer), val_fraction=0.1, progress=False))
    return out
