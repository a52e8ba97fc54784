"""Malformed lines in every JSONL / Parquet input: problem files of each task (`tokenmdp eval --data`, `score`),
DPO pairs, and MDP files. Each bad line or row gives one TokenMDPError naming the file and the line (Parquet rows
are numbered like lines); nothing is skipped silently."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.tabular_io import load_mdp
from tokenmdp.tasks import get_task
from tokenmdp.train.data import load_pairs

GOOD = {
    "countdown": {"nums": [3, 5, 7], "target": 56},
    "gsm8k": {"question": "2+2?", "answer": "so 4\n#### 4"},
    "pairs": {"prompt": "p", "chosen": "a", "rejected": "b"},
}
BROKEN = {  # (what, the second record as written, the error's words)
    "countdown": [("missing field", {"nums": [3, 5, 7]}, "missing field 'target'"),
                  ("wrong type", {"nums": "3 5 7", "target": 56}, "")],
    "gsm8k": [("missing field", {"question": "q"}, "missing field 'answer'"),
              ("no final answer", {"question": "q", "answer": "no hashes"}, "")],
    "pairs": [("missing field", {"prompt": "p", "chosen": "a"}, "rejected"),
              ("wrong type", {"prompt": "p", "chosen": "a", "rejected": 3}, "must be a string")],
}


def _reader(kind):
    if kind == "pairs":
        return load_pairs
    return get_task(kind).load_problems


class JsonValue(pa.ExtensionType):
    """A Parquet column whose cells are JSON values of any type (stored as JSON text; read back, with this type
    registered, as the values themselves): a column of one Arrow type whose rows differ in Python type, as
    a record with a wrong-typed field among good ones needs."""

    def __init__(self):
        super().__init__(pa.string(), "tokenmdp-tests.json_value")

    def __arrow_ext_serialize__(self):
        return b""

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type, serialized):
        return cls()

    def __arrow_ext_scalar_class__(self):
        return JsonScalar


class JsonScalar(pa.ExtensionScalar):
    def as_py(self, **kwargs):
        return None if self.value is None else json.loads(self.value.as_py())


try:
    pa.register_extension_type(JsonValue())
except pa.ArrowKeyError:  # registered already (the module imported twice)
    pass


def _write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types in a column: JSON-valued columns
        keys = list(dict.fromkeys(k for r in rows for k in r))
        table = pa.table({k: pa.ExtensionArray.from_storage(
            JsonValue(), pa.array([json.dumps(r[k]) if k in r else None for r in rows], pa.string()))
            for k in keys})
    pq.write_table(table, path)
    return path


CASES = [(kind, what, bad, words) for kind, items in BROKEN.items() for what, bad, words in items]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("kind, what, bad, words", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_a_bad_record_names_file_and_line(tmp_path, fmt, kind, what, bad, words):
    path = _write(tmp_path / f"data.{fmt}", [GOOD[kind], bad, GOOD[kind]], fmt)
    if fmt == "parquet":  # the file holds the mixed record as written: the reader sees the bad row's own types
        assert pq.read_table(path).to_pylist()[1] == {k: bad.get(k) for k in {**GOOD[kind], **bad}}
    with pytest.raises(TokenMDPError) as err:
        _reader(kind)(path)
    assert f"{path}:2" in str(err.value) and words in str(err.value), str(err.value)


@pytest.mark.parametrize("kind", list(GOOD))
def test_invalid_json_and_an_empty_file(tmp_path, kind):
    path = _write(tmp_path / "data.jsonl", [GOOD[kind], "{not json", GOOD[kind]], "jsonl")
    with pytest.raises(TokenMDPError, match=rf"{path}:2: not valid JSON"):
        _reader(kind)(path)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(TokenMDPError, match="cannot read Parquet file"):
        _reader(kind)(tmp_path / "bad.parquet")


@pytest.mark.parametrize("text, words", [
    ("{\"P\": [[[1.0]]], \"r\": [[0.0]], ", "not valid"),
    ("{\"P\": [[[0.5]]], \"r\": [[0.0]], \"gamma\": 0.9}", "P"),
    ("{\"r\": [[0.0]], \"gamma\": 0.9}", "P"),
    ("{\"P\": [[[1.0]]], \"r\": [[0.0]], \"gamma\": 1.5}", "gamma"),
])
def test_mdp_files_name_the_file_and_field(tmp_path, text, words):
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(TokenMDPError) as err:
        load_mdp(path)
    assert str(path) in str(err.value) and words in str(err.value), str(err.value)
