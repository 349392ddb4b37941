import json
import shutil

import pytest

from ptlm.data import tokenizer as toks
from ptlm.errors import PtlmError

TEXT = "Olá, mundo!\n\nÉ um  teste — com acentuação: ção, õ, ü. 123"


def test_folder_with_tokenizer_json(tmp_path, shared_gpt2_tokenizer):
    toks.materialize(str(shared_gpt2_tokenizer), tmp_path / "t")
    info = toks.describe(tmp_path / "t", "gpt2")
    assert (info.vocab_size, info.eos_id, info.eos_token) == (50257, 50256, "<|endoftext|>")
    assert info.model_max_length == 1024


def test_gpt2_vocab_and_merges_only_equals_the_full_tokenizer(tmp_path, shared_gpt2_tokenizer):
    vm = tmp_path / "vm"
    vm.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(shared_gpt2_tokenizer / name, vm / name)
    toks.materialize(str(vm), tmp_path / "a")
    toks.materialize(str(shared_gpt2_tokenizer), tmp_path / "b")
    a, b = toks.load(tmp_path / "a"), toks.load(tmp_path / "b")
    ids = a.encode(TEXT, add_special_tokens=False).ids
    assert len(ids) > 10
    assert ids == b.encode(TEXT, add_special_tokens=False).ids
    assert a.decode(ids) == TEXT
    assert toks.describe(tmp_path / "a", "vm").eos_id == 50256


def test_trained_bpe_round_trips_and_loads_in_transformers(demo_tokenizer):
    from transformers import AutoTokenizer

    tok = toks.load(demo_tokenizer)
    info = toks.describe(demo_tokenizer, "trained")
    assert info.vocab_size == 1024
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    assert tok.decode(ids) == TEXT
    hf = AutoTokenizer.from_pretrained(str(demo_tokenizer))
    assert hf.eos_token_id == info.eos_id
    assert hf(TEXT, add_special_tokens=False)["input_ids"] == ids


def test_missing_eos_is_a_clear_error(tmp_path, shared_gpt2_tokenizer):
    toks.materialize(str(shared_gpt2_tokenizer), tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    cfg.pop("eos_token")
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "t" / "special_tokens_map.json").unlink(missing_ok=True)
    with pytest.raises(PtlmError, match="--eos-token"):
        toks.describe(tmp_path / "t", "x")
    toks.materialize(str(tmp_path / "t"), tmp_path / "u", eos_token="<|endoftext|>")
    assert toks.describe(tmp_path / "u", "x").eos_id == 50256


def test_unknown_tokenizer_name_fails_clearly(tmp_path):
    with pytest.raises(PtlmError, match="cannot load tokenizer"):
        toks.materialize("nobody/no-such-tokenizer", tmp_path / "t")


def test_tiny_train_vocab_refused(tmp_path):
    with pytest.raises(PtlmError, match="at least 257"):
        toks.train_bpe(["abc"], 100, tmp_path)
