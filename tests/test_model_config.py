"""ptlm.model.config.resolve_config: the built-in table needs no network, and a hub name that
cannot be reached fails at once instead of after ~30 s of retries (issue 9)."""

import time

import pytest
import transformers

from ptlm import hub
from ptlm.errors import PtlmError
from ptlm.model import config as mc


@pytest.fixture
def hub_calls(monkeypatch):
    """Every AutoConfig.from_pretrained call; only cache lookups (local_files_only) succeed."""
    calls = []

    def fake(source, **kw):
        calls.append((source, kw.get("local_files_only", False)))
        raise OSError("not cached" if kw.get("local_files_only") else "network call!")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake)
    return calls


@pytest.fixture
def online(monkeypatch):
    for key in (*hub.OFFLINE_ENV, *hub.PROXY_ENV):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize("offline", [True, False])
def test_well_known_hub_names_come_from_the_table(monkeypatch, hub_calls, online, offline):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    cfg = mc.resolve_config("facebook/opt-125m")
    assert time.perf_counter() - t0 < 2
    assert cfg.model_type == "opt" and cfg.hidden_size == 768 and mc.max_positions(cfg) == 2048
    assert hub_calls == []
    assert mc.resolve_config("openai-community/gpt2").n_embd == 768


def test_unknown_name_offline_fails_fast_after_the_cache(monkeypatch, hub_calls):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(PtlmError, match=r"someone/unknown: not a local folder nor in the local "
                                        r"Hugging Face cache, and the hub is off "
                                        r"\(HF_HUB_OFFLINE\)"):
        mc.resolve_config("someone/unknown")
    assert time.perf_counter() - t0 < 2
    assert hub_calls == [("someone/unknown", True)]  # the cache only


def test_unknown_name_with_the_hub_unreachable_fails_fast(monkeypatch, hub_calls, online):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: like no network
    t0 = time.perf_counter()
    with pytest.raises(PtlmError, match=r"hub is unreachable \(127.0.0.1:9: .*\); set "
                                        r"HF_HUB_OFFLINE=1"):
        mc.resolve_config("someone/unknown")
    assert time.perf_counter() - t0 < hub.HUB_PROBE_TIMEOUT_S + 1
    assert hub_calls == [("someone/unknown", True)]  # no network call, no retries


def test_a_cached_hub_config_still_resolves_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = transformers.OPTConfig(hidden_size=32)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda source, **kw: cached if kw.get("local_files_only") else None)
    assert mc.resolve_config("someone/cached") is cached


def test_config_only_folder_without_from_scratch_says_how(tmp_path):
    from ptlm.model.load import load_model

    transformers.OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                           word_embed_proj_dim=16).save_pretrained(tmp_path)
    with pytest.raises(PtlmError, match=r"config.json but no weights.*--from-scratch to train "
                                        r"this architecture from a random initialization"):
        load_model(str(tmp_path), "fp32")
