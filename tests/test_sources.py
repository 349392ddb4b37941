import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ptlm.data.sources import (
    SourceOptions,
    SourceStats,
    iter_documents,
    resolve_sources,
)
from ptlm.errors import PtlmError


def docs(paths, **kw):
    return list(iter_documents(resolve_sources([str(p) for p in paths]), SourceOptions(**kw)))


def test_txt_modes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("um\ndois\n\ntrês\n\n\nquatro", encoding="utf-8")
    assert docs([f]) == ["um\ndois\n\ntrês\n\n\nquatro"]
    assert docs([f], txt_docs="lines") == ["um", "dois", "três", "quatro"]
    assert docs([f], txt_docs="blank-lines") == ["um\ndois", "três", "quatro"]


def test_jsonl_json_array_parquet_and_datasets_folder(tmp_path):
    import datasets

    rows = [{"text": "olá", "id": 1}, {"text": "mundo", "id": 2}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    pq.write_table(pa.table({"text": ["x", "y"], "n": [1, 2]}), tmp_path / "c.parquet")
    datasets.Dataset.from_dict({"text": ["d1", "d2"]}).save_to_disk(str(tmp_path / "ds"))
    assert docs([tmp_path / "a.jsonl"]) == ["olá", "mundo"]
    assert docs([tmp_path / "b.json"]) == ["olá", "mundo"]
    assert docs([tmp_path / "c.parquet"]) == ["x", "y"]
    assert docs([tmp_path / "ds"]) == ["d1", "d2"]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]}),
                               "test": datasets.Dataset.from_dict({"text": ["u"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert docs([tmp_path / "dd"]) == ["t"]
    assert docs([tmp_path / "dd"], hf_split="test") == ["u"]


def test_folders_and_globs_are_sorted_and_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "sub" / "c.txt").write_text("C")
    (tmp_path / "notes.md").write_text("ignored")
    assert docs([tmp_path]) == ["A", "B", "C"]
    assert docs([tmp_path / "*.txt"]) == ["A", "B"]


def test_empty_documents_are_skipped_and_counted(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": ""}\n{"text": "x"}\n{"text": null}\n')
    stats = SourceStats()
    out = list(iter_documents(resolve_sources([str(tmp_path / "a.jsonl")]), SourceOptions(),
                              stats))
    assert out == ["x"] and stats.documents == 1 and stats.empty_skipped == 2


@pytest.mark.parametrize("spec, match", [
    ("nope/missing.jsonl", "does not exist"),
    ("*.nothing", "matched no file"),
])
def test_missing_sources(tmp_path, monkeypatch, spec, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PtlmError, match=match):
        resolve_sources([spec])


def test_unsupported_and_empty_folder(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(PtlmError, match="unsupported file type"):
        resolve_sources([str(tmp_path / "x.csv")])
    with pytest.raises(PtlmError, match="holds no"):
        resolve_sources([str(tmp_path)])


def test_missing_text_field_names_the_fields(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x", "id": 3}\n')
    with pytest.raises(PtlmError, match=r"a.jsonl:1: no field 'text' \(fields: body, id\)"):
        docs([tmp_path / "a.jsonl"])
    assert docs([tmp_path / "a.jsonl"], text_field="body") == ["x"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(PtlmError, match="no column 'text'"):
        docs([tmp_path / "c.parquet"])


def test_bad_json_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(PtlmError, match="a.jsonl:2: not valid JSON"):
        docs([tmp_path / "a.jsonl"])


def test_undecodable_bytes_policy(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes("boa\n".encode() + b"ma\xffl\n")
    with pytest.raises(PtlmError, match=r"invalid UTF-8 at byte 6.*--decode-errors replace"):
        docs([f])
    with pytest.raises(PtlmError, match=r"a.txt:2: invalid UTF-8 at byte 2"):
        docs([f], txt_docs="lines")
    stats = SourceStats()
    out = list(iter_documents(resolve_sources([str(f)]),
                              SourceOptions(txt_docs="lines", decode_errors="replace"), stats))
    assert out == ["boa", "ma\ufffdl"] and stats.replaced == 1


def test_utf8_bom_is_dropped(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b'{"text": "x"}\n')
    assert docs([f]) == ["x"]


def test_hub_name_offline_fails_clearly():
    with pytest.raises(PtlmError, match="Hugging Face Hub dataset failed"):
        docs(["someone/not-a-dataset-xyz"])


# ------------------------------------------------------------ bad rows and skipped files (issue 9)

def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_every_bad_row_is_reported_in_one_pass(tmp_path):
    rows = [{"text": f"doc {i}"} for i in range(50)]
    rows[3] = {"body": "x"}
    rows[10] = '{"text": '
    rows[20] = {"text": 7}
    rows[40] = ["text"]
    f = jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(PtlmError) as e:
        docs([f])
    msg = str(e.value)
    assert msg.startswith("4 row(s) without usable text")
    for line, what in ((4, "no field 'text'"), (11, "not valid JSON"),
                       (21, "field 'text' is int, not text"), (41, "expected a JSON object")):
        assert f"a.jsonl:{line}: {what}" in msg
    assert "--skip-bad-rows" in msg and "--text-field" not in msg  # 46 rows have the field
    stats = SourceStats()
    got = list(iter_documents(resolve_sources([str(f)]), SourceOptions(skip_bad_rows=True), stats))
    assert len(got) == 46 and stats.bad_rows == 4 and stats.documents == 46


def test_wrong_text_field_advises_text_field_and_stops_after_the_cap(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [{"body": f"doc {i}"} for i in range(1000)])
    with pytest.raises(PtlmError) as e:
        docs([f])
    msg = str(e.value)
    assert msg.startswith("more than 20 row(s)") and "pass --text-field NAME" in msg
    assert "a.jsonl:20:" in msg and "a.jsonl:21:" not in msg and "scan stopped" in msg


def test_skipped_files_of_a_folder_are_named(tmp_path, caplog):
    jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    (tmp_path / "notes.csv").write_text("a,b")
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "missing.jsonl")
    with caplog.at_level("WARNING", logger="ptlm.data.sources"):
        srcs = resolve_sources([str(tmp_path)])
    assert [s.location for s in srcs] == [str(tmp_path / "a.jsonl")]
    assert "skipping 2 file(s)" in caplog.text
    assert "gone.jsonl (dangling symlink)" in caplog.text
    assert "notes.csv (unsupported type '.csv')" in caplog.text


def test_output_and_prepare_temporaries_are_never_inputs(tmp_path, caplog):
    jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    for folder in ("out", ".out.tmp-123"):
        (tmp_path / folder / "tokenizer").mkdir(parents=True)
        (tmp_path / folder / "manifest.json").write_text("{}")
        (tmp_path / folder / "tokenizer" / "tokenizer.json").write_text("{}")
    with caplog.at_level("WARNING", logger="ptlm.data.sources"):
        srcs = resolve_sources([str(tmp_path)], exclude=[tmp_path / "out"])
        globbed = resolve_sources([str(tmp_path / "**" / "*.json*")], exclude=[tmp_path / "out"])
    assert [s.location for s in srcs] == [str(tmp_path / "a.jsonl")]
    assert [s.location for s in globbed] == [str(tmp_path / "a.jsonl")]
    assert f"inside --out {tmp_path / 'out'}" in caplog.text
    assert "a temporary folder of `ptlm prepare`" in caplog.text
