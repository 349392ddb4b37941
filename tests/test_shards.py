import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from ptlm.data import shards
from ptlm.data.shards import ShardWriter, open_split, read_manifest, verify
from ptlm.errors import PtlmError


@pytest.fixture
def data(tmp_path, demo_dataset):
    dst = tmp_path / "d"
    shutil.copytree(demo_dataset, dst)
    return dst


def train_shard(root):
    return root / read_manifest(root)["splits"]["train"]["shards"][0]["file"]


def test_verify_passes_on_a_fresh_dataset(data):
    assert verify(data) == []


def test_flipped_byte_is_caught_by_verify(data):
    path = train_shard(data)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the token values: structure intact, content not
    path.write_bytes(bytes(raw))
    problems = verify(data)
    assert len(problems) == 1 and "sha256" in problems[0] and path.name in problems[0]


def test_truncated_shard_fails_on_open_with_the_fix(data):
    path = train_shard(data)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PtlmError, match=r"size 1000 bytes.*ptlm verify"):
        open_split(data, read_manifest(data), "train")


def test_foreign_shard_is_refused(data, tmp_path):
    # a well-formed Arrow file of another dataset (other seq_len), same size on disk
    path = train_shard(data)
    m = read_manifest(data)
    w = ShardWriter(tmp_path / "other", "train", 32, np.uint16)
    w.write(np.zeros((m["splits"]["train"]["shards"][0]["rows"] * 2, 32), np.uint16))
    other = w.close()[0]
    shutil.copy(tmp_path / "other" / other["file"], path)
    m["splits"]["train"]["shards"][0]["bytes"] = other["bytes"]
    (data / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PtlmError, match="schema"):
        open_split(data, m, "train")


def test_garbage_shard(data):
    path = train_shard(data)
    path.write_bytes(b"\0" * path.stat().st_size)
    with pytest.raises(PtlmError, match="not a readable Arrow IPC file"):
        open_split(data, read_manifest(data), "train")


def test_manifest_checks(data, tmp_path):
    m = read_manifest(data)
    (data / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(PtlmError, match="format version 99"):
        read_manifest(data)
    (data / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(PtlmError, match="not a ptlm dataset manifest"):
        read_manifest(data)
    (data / "manifest.json").write_text("{not json")
    with pytest.raises(PtlmError, match="corrupt"):
        read_manifest(data)
    with pytest.raises(PtlmError, match="no manifest.json"):
        read_manifest(tmp_path)


def test_writer_batches_and_take_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "RECORD_BATCH_BYTES", 8 * 2 * 3)  # 3 rows of 8 per batch
    w = ShardWriter(tmp_path, "train", 8, np.uint16, shard_bytes=8 * 2 * 7)  # 7 rows/shard
    data = np.arange(20 * 8, dtype=np.uint16).reshape(20, 8)
    for part in np.array_split(data, 6):
        w.write(part)
    meta = w.close()
    assert [s["rows"] for s in meta] == [7, 7, 6]
    manifest = {"seq_len": 8, "dtype": "uint16",
                "splits": {"train": {"shards": meta, "blocks": 20}}}
    blocks = open_split(tmp_path, manifest, "train")
    assert len(blocks.chunks) > 3
    idx = np.random.default_rng(0).permutation(20)
    np.testing.assert_array_equal(blocks.take(idx), data[idx])
    reader = pa.ipc.open_file(tmp_path / meta[0]["file"])
    assert reader.schema.field("input_ids").type == pa.list_(pa.uint16(), 8)


# ------------------------------------------------------------ checks before training (issue 9)

def out_of_vocab_id(root):
    """Set the high byte of one token id of the first train block: the id leaves the vocabulary
    (demo vocab 1024) while the Arrow structure stays intact."""
    path = train_shard(root)
    first = open_split(root, read_manifest(root), "train").take([0])[0]
    raw = bytearray(path.read_bytes())
    at = raw.find(first[:16].astype("<u2").tobytes())
    assert at > 0
    raw[at + 1] = 0xFF
    path.write_bytes(bytes(raw))
    return path


def test_check_for_training_passes_on_a_fresh_dataset(data):
    got = shards.check_for_training(data)
    assert got["mode"] == "full" and 0 < got["max_id"] < 1024 and got["bytes"] > 0


def test_check_for_training_catches_a_flipped_byte_inside_the_vocabulary(data):
    path = train_shard(data)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # still a valid id (< 1024 or not, the hash sees it)
    path.write_bytes(bytes(raw))
    with pytest.raises(PtlmError, match=r"(?s)is corrupt.*sha256.*ptlm prepare"):
        shards.check_for_training(data)


def test_check_for_training_catches_ids_outside_the_vocabulary_without_hashing(data, monkeypatch):
    out_of_vocab_id(data)
    monkeypatch.setenv(shards.DATA_CHECK_ENV, "ids")  # no sha256: the id check alone
    with pytest.raises(PtlmError, match=r"split 'train': token id 65\d\d\d >= vocabulary size "
                                        r"1024.*ptlm prepare"):
        shards.check_for_training(data)
    monkeypatch.setenv(shards.DATA_CHECK_ENV, "off")
    assert shards.check_for_training(data)["max_id"] is None
    monkeypatch.setenv(shards.DATA_CHECK_ENV, "fast")
    with pytest.raises(PtlmError, match="PTLM_DATA_CHECK='fast'"):
        shards.check_for_training(data)


def test_inspect_checks_the_shards_first(data, capsys):
    from ptlm.cli import main

    out_of_vocab_id(data)
    assert main(["inspect", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ptlm inspect: error:") and "sha256" in err
