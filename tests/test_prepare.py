import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ptlm.data import prepare as prep
from ptlm.data import shards
from ptlm.data import tokenizer as toks
from ptlm.data.prepare import PrepareConfig, prepare
from ptlm.errors import PtlmError
from tests.support import DEMO_CORPUS, ROOT


def cfg(tmp_path, **kw):
    base = dict(sources=[str(DEMO_CORPUS)], out=tmp_path / "out", seq_len=64,
                val_fraction=0.1, progress=False)
    base.update(kw)
    return PrepareConfig(**base)


def split_ids(root, manifest, split):
    blocks = shards.open_split(root, manifest, split)
    return blocks.take(np.arange(blocks.num_blocks)).reshape(-1)


def test_round_trip_blocks_are_the_documents_joined_by_eos(demo_dataset, demo_docs):
    manifest = shards.read_manifest(demo_dataset)
    tok = toks.load(demo_dataset / "tokenizer")
    eos = manifest["eos_id"]
    T = manifest["seq_len"]
    # reconstruct which documents went where from the decoded streams
    seen = []
    for split in ("train", "val"):
        ids = split_ids(demo_dataset, manifest, split)
        info = manifest["splits"][split]
        assert len(ids) == info["blocks"] * T == info["tokens"] - info["dropped_tokens"]
        assert 0 <= info["dropped_tokens"] < T
        text = tok.decode(ids.tolist(), skip_special_tokens=False)
        pieces = text.split(manifest["tokenizer"]["eos_token"])
        # every complete piece is a whole document, in corpus order; the last one is cut
        docs_here = pieces[:-1]
        assert docs_here and all(d in demo_docs for d in docs_here)
        order = [demo_docs.index(d) for d in docs_here]
        assert order == sorted(order)
        # and the ids are exactly the per-document encodings + EOS, concatenated
        expected = np.concatenate([np.array(tok.encode(d, add_special_tokens=False).ids + [eos])
                                   for d in docs_here])
        np.testing.assert_array_equal(ids[:len(expected)], expected)
        seen.append(set(order))
    train, val = seen
    assert not train & val, "a document is in both train and val"


def test_split_accounts_for_every_document_and_token(demo_dataset, demo_docs):
    m = shards.read_manifest(demo_dataset)
    assert m["documents"] == len(demo_docs)
    assert sum(s["documents"] for s in m["splits"].values()) == len(demo_docs)
    assert sum(s["tokens"] for s in m["splits"].values()) == m["tokens"]
    val_share = m["splits"]["val"]["tokens"] / m["tokens"]
    assert 0.05 < val_share <= 0.1


def test_num_proc_and_reruns_give_identical_shards(tmp_path, demo_tokenizer):
    a = prepare(cfg(tmp_path, out=tmp_path / "a", tokenizer=str(demo_tokenizer)))
    b = prepare(cfg(tmp_path, out=tmp_path / "b", tokenizer=str(demo_tokenizer), num_proc=2))
    c = prepare(cfg(tmp_path, out=tmp_path / "c", tokenizer=str(demo_tokenizer), seed=1))
    hashes = lambda m: [s["sha256"] for sp in m["splits"].values() for s in sp["shards"]]
    assert hashes(a) == hashes(b)
    assert hashes(a) != hashes(c)  # another seed, another split


def test_shards_roll_over_and_read_back_in_order(tmp_path, demo_tokenizer):
    small = prepare(cfg(tmp_path, out=tmp_path / "s", tokenizer=str(demo_tokenizer),
                        shard_bytes=64 * 2 * 50))  # 50 blocks of 64 uint16 per shard
    big = prepare(cfg(tmp_path, out=tmp_path / "b", tokenizer=str(demo_tokenizer)))
    assert len(small["splits"]["train"]["shards"]) > 2
    assert all(s["rows"] <= 50 for s in small["splits"]["train"]["shards"])
    np.testing.assert_array_equal(split_ids(tmp_path / "s", small, "train"),
                                  split_ids(tmp_path / "b", big, "train"))


def test_trained_tokenizer_is_saved_and_used(tmp_path):
    m = prepare(cfg(tmp_path, train_tokenizer=512))
    assert m["tokenizer"]["vocab_size"] == 512 and m["dtype"] == "uint16"
    assert m["tokenizer"]["source"] == "trained:512"
    ids = split_ids(tmp_path / "out", m, "train")
    assert ids.max() < 512


def test_large_vocab_is_stored_as_uint32(tmp_path, shared_gpt2_tokenizer):
    from tokenizers import AddedToken

    big = tmp_path / "big"
    toks.materialize(str(shared_gpt2_tokenizer), big)
    tok = toks.load(big)
    tok.add_tokens([AddedToken(f"<extra_{i}>") for i in range(16_000)])
    tok.save(str(big / "tokenizer.json"))
    doc = tmp_path / "d.txt"
    doc.write_text("palavra <extra_15999> " * 300)
    m = prepare(cfg(tmp_path, sources=[str(doc), str(DEMO_CORPUS)], tokenizer=str(big)))
    assert m["dtype"] == "uint32" and m["tokenizer"]["vocab_size"] == 66_257
    ids = np.concatenate([split_ids(tmp_path / "out", m, s) for s in ("train", "val")])
    assert ids.max() == 66_256


def test_refuses_existing_dir_and_overwrites_only_when_asked(tmp_path, demo_tokenizer):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(PtlmError, match="already exists; pass --overwrite"):
        cfg(tmp_path, tokenizer=str(demo_tokenizer))
    prepare(cfg(tmp_path, tokenizer=str(demo_tokenizer), overwrite=True))
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "manifest.json").exists()


def test_interrupted_run_leaves_no_dir_and_keeps_the_old_one(tmp_path, demo_tokenizer,
                                                              monkeypatch):
    prepare(cfg(tmp_path, tokenizer=str(demo_tokenizer)))
    before = (tmp_path / "out" / "manifest.json").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "pack_split", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg(tmp_path, tokenizer=str(demo_tokenizer), overwrite=True))
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg(tmp_path, out=tmp_path / "new", tokenizer=str(demo_tokenizer)))
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp, no half-made DIR


@pytest.mark.parametrize("kw, match", [
    (dict(seq_len=1), "--seq-len must be >= 2"),
    (dict(), "exactly one of --tokenizer"),
    (dict(tokenizer="x", train_tokenizer=300), "exactly one of --tokenizer"),
    (dict(tokenizer="x", val_fraction=1.0), "val-fraction"),
    (dict(tokenizer="x", num_proc=0), "num-proc"),
])
def test_config_errors(tmp_path, kw, match):
    with pytest.raises(PtlmError, match=match):
        cfg(tmp_path, **kw)


def test_empty_corpus(tmp_path, demo_tokenizer):
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(PtlmError, match="corpus is empty"):
        prepare(cfg(tmp_path, sources=[str(tmp_path / "e.jsonl")], tokenizer=str(demo_tokenizer)))
    assert not (tmp_path / "out").exists()


def test_seq_len_above_tokenizer_or_model_positions(tmp_path, shared_gpt2_tokenizer):
    with pytest.raises(PtlmError, match="above the tokenizer's model_max_length 1024"):
        prepare(cfg(tmp_path, tokenizer=str(shared_gpt2_tokenizer), seq_len=2048))
    from transformers import OPTConfig

    model = tmp_path / "model"
    OPTConfig(max_position_embeddings=32, hidden_size=16, num_hidden_layers=1,
              ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16).save_pretrained(model)
    r = run_cli("prepare", DEMO_CORPUS, "--tokenizer", shared_gpt2_tokenizer,
                "--seq-len", 64, "--model", model, "--out", tmp_path / "out")
    assert r.returncode == 2 and "above the 32 positions of model" in r.stderr, r.stderr


def test_corpus_too_small_for_a_val_block(tmp_path, demo_tokenizer):
    (tmp_path / "s.jsonl").write_text('{"text": "um"}\n{"text": "dois"}\n')
    with pytest.raises(PtlmError, match="cannot hold out a validation split"):
        prepare(cfg(tmp_path, sources=[str(tmp_path / "s.jsonl")], tokenizer=str(demo_tokenizer)))


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "ptlm.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_prepare_inspect_verify(tmp_path, demo_tokenizer):
    out = tmp_path / "d"
    r = run_cli("prepare", DEMO_CORPUS, "--tokenizer", demo_tokenizer, "--seq-len", 32,
                "--out", out, "--val-fraction", 0.1)
    assert r.returncode == 0, r.stderr
    assert "train:" in r.stdout and "tokens dropped" in r.stdout
    r = run_cli("inspect", out, "--json")
    data = json.loads(r.stdout)
    assert data["manifest"]["seq_len"] == 32 and len(data["first_blocks"]["val"]["ids"]) == 32
    r = run_cli("verify", out)
    assert r.returncode == 0 and "OK" in r.stdout
    r = run_cli("prepare", DEMO_CORPUS, "--tokenizer", demo_tokenizer, "--seq-len", 32,
                "--out", out)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("prepare", tmp_path / "missing.jsonl", "--tokenizer", demo_tokenizer,
                "--seq-len", 32, "--out", tmp_path / "x")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_prepare_does_not_import_torch(tmp_path, demo_tokenizer):
    code = ("import sys; from ptlm.cli import main; "
            f"main(['prepare', r'{DEMO_CORPUS}', '--tokenizer', r'{demo_tokenizer}', "
            f"'--seq-len', '32', '--out', r'{tmp_path / 'o'}', '--no-progress']); "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


# ------------------------------------------------------------ issue 9: leftovers, bad input

def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_killed_runs_are_removed_and_named(tmp_path, demo_tokenizer, caplog):
    dead = tmp_path / f".out.tmp-{dead_pid()}"
    (dead / "train").mkdir(parents=True)
    (dead / "stream.tmp").write_bytes(b"\0" * 4096)  # what a SIGKILL leaves: the token stream
    old = tmp_path / f".out.old-{dead_pid()}"
    old.mkdir()
    alive = tmp_path / f".out.tmp-{os.getppid()}"  # a running process: maybe another prepare
    alive.mkdir()
    other = tmp_path / f".other.tmp-{dead_pid()}"  # another --out's: not ours to judge
    other.mkdir()
    with caplog.at_level("WARNING", logger="ptlm.data.prepare"):
        prepare(cfg(tmp_path, tokenizer=str(demo_tokenizer)))
    assert not dead.exists() and not old.exists() and alive.exists() and other.exists()
    assert f"removed {dead}" in caplog.text and "interrupted `ptlm prepare`" in caplog.text
    assert f"{alive} belongs to a running process" in caplog.text


def test_dataset_moved_aside_by_a_killed_overwrite_is_restored(tmp_path, demo_tokenizer, caplog):
    prepare(cfg(tmp_path, tokenizer=str(demo_tokenizer)))
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    old = tmp_path / f".out.old-{dead_pid()}"
    os.replace(tmp_path / "out", old)  # killed between _commit's two renames
    with caplog.at_level("WARNING", logger="ptlm.data.prepare"):
        with pytest.raises(PtlmError, match="already exists; pass --overwrite"):
            prepare(cfg(tmp_path, tokenizer=str(demo_tokenizer)))
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before and not old.exists()
    assert f"restored {tmp_path / 'out'} from {old}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unreadable_source_is_not_called_an_output_error(tmp_path, demo_tokenizer):
    import errno

    e = OSError(errno.EACCES, "Permission denied", str(tmp_path / "corpus.jsonl"))
    assert not prep._is_output_error(e, tmp_path / "out", tmp_path / ".out.tmp-1")
    e = OSError(errno.EACCES, "Permission denied", str(tmp_path))  # mkdir of --out's parent
    assert prep._is_output_error(e, tmp_path / "x" / "out", tmp_path / "x" / ".out.tmp-1")


def test_read_only_out_is_one_line_error(tmp_path, demo_tokenizer, monkeypatch, capsys):
    import errno
    import pathlib

    from ptlm.cli import main

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    code = main(["prepare", str(DEMO_CORPUS), "--tokenizer", str(demo_tokenizer), "--seq-len",
                 "32", "--out", str(tmp_path / "ro" / "d"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "read-only file system" in err and "choose a writable --out" in err


def test_out_inside_the_source_folder_is_not_read_back(tmp_path, demo_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(DEMO_CORPUS.read_text("utf-8"))
    first = prepare(cfg(tmp_path, sources=[str(corpus)], out=corpus / "prepared",
                        tokenizer=str(demo_tokenizer)))
    again = prepare(cfg(tmp_path, sources=[str(corpus)], out=corpus / "prepared",
                        tokenizer=str(demo_tokenizer), overwrite=True))
    assert again["sources"] == first["sources"] and again["tokens"] == first["tokens"]


def test_skip_bad_rows_counts_them_in_the_manifest(tmp_path, demo_tokenizer):
    rows = DEMO_CORPUS.read_text("utf-8").splitlines()
    rows[5:5] = ['{"body": "x"}', "{not json"]
    (tmp_path / "c.jsonl").write_text("\n".join(rows) + "\n")
    args = ("prepare", tmp_path / "c.jsonl", "--tokenizer", demo_tokenizer, "--seq-len", 32,
            "--no-progress")
    r = run_cli(*args, "--out", tmp_path / "a")
    assert r.returncode == 2 and "2 row(s) without usable text" in r.stderr
    assert "c.jsonl:6: no field 'text'" in r.stderr and "c.jsonl:7: not valid JSON" in r.stderr
    r = run_cli(*args, "--out", tmp_path / "b", "--skip-bad-rows")
    assert r.returncode == 0, r.stderr
    m = shards.read_manifest(tmp_path / "b")
    assert m["bad_rows_skipped"] == 2 and m["documents"] == len(rows) - 2


def test_val_share_far_from_val_fraction_is_warned(tmp_path, demo_tokenizer, caplog):
    (tmp_path / "s.jsonl").write_text(
        "".join(json.dumps({"text": f"texto {i} " * 40}) + "\n" for i in range(4)))
    with caplog.at_level("WARNING", logger="ptlm.data.prepare"):
        m = prepare(cfg(tmp_path, sources=[str(tmp_path / "s.jsonl")], seq_len=32,
                        tokenizer=str(demo_tokenizer), val_fraction=0.05))
    assert m["splits"]["val"]["tokens"] > 0.15 * m["tokens"]
    assert "not the 5.0% of --val-fraction 0.05" in caplog.text
    with pytest.raises(PtlmError, match=r"--val-fraction 0 is not supported: training measures "
                                        r"validation loss.*--val-fraction 0.001"):
        cfg(tmp_path, out=tmp_path / "z", tokenizer=str(demo_tokenizer), val_fraction=0.0)


def _llama3_style_tokenizer(dest, demo_docs):
    """A BPE whose post-processor adds a BOS to every text, as Llama 3's and Gemma's do, with its
    own EOS; transformers loads it as those tokenizers are loaded (tokenizer.json + config)."""
    from tokenizers import processors

    toks.train_bpe(demo_docs, 600, dest)
    tok = toks.load(dest)
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>"}))
    return dest, bos, tok.token_to_id("<|end_of_text|>")


def test_documents_start_with_the_bos_the_tokenizer_adds(tmp_path, demo_docs):
    from transformers import AutoTokenizer

    folder, bos, eos = _llama3_style_tokenizer(tmp_path / "tok", demo_docs)
    hf = AutoTokenizer.from_pretrained(folder)  # the reference: transformers' own framing
    assert hf("a")["input_ids"][0] == bos and hf.eos_token_id == eos
    out = tmp_path / "data"
    manifest = prepare(cfg(tmp_path, out=out, tokenizer=str(folder), seq_len=32,
                           val_fraction=0.1))
    assert (manifest["bos_id"], manifest["eos_id"]) == (bos, eos)
    stream = np.concatenate([split_ids(out, manifest, s) for s in ("train", "val")])
    eos_at = np.flatnonzero(stream == eos)
    # every document boundary inside the stream is EOS then BOS, and the stream opens with BOS
    # (the first train block is the first train document's start)
    assert stream[0] == bos
    inner = eos_at[eos_at + 1 < len(stream)]
    assert (stream[inner + 1] == bos).all() and len(inner) > 10
    # a document reads back as transformers encodes it, framed: BOS + its ids, then EOS
    framed = {tuple(hf(d)["input_ids"] + [eos]) for d in demo_docs}
    assert tuple(stream[:eos_at[0] + 1].tolist()) in framed
    assert tuple(stream[inner[0] + 1:inner[1] + 1].tolist()) in framed


def test_a_tokenizer_without_bos_frames_documents_with_eos_only(demo_dataset):
    manifest = shards.read_manifest(demo_dataset)
    assert manifest["bos_id"] is None
