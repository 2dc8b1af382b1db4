"""Data contracts: round trips, and every kind of bad record gives a named error and no file."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_contracts import (
    INSTRUCTIONS,
    METRIC_TABLE,
    PREDICTIONS,
    REJECTS,
    STYLES,
    ContractError,
    InstructionRecord,
    MetricRecord,
    PredictionRecord,
    RejectRecord,
)


def rec(i: int = 0, **kw) -> InstructionRecord:
    base = dict(
        id=f"t-train-{i:05d}",
        task="01-scienceqa",
        split="train",
        image=f"01-scienceqa/train/{i:05d}.png",
        question="Which object is red?\nA. ball\nB. box",
        answer="A",
        style="mcq",
        origin="original",
        source_id=f"t-train-{i:05d}",
        meta=json.dumps({"options": ["ball", "box"]}),
    )
    base.update(kw)
    return InstructionRecord(**base)


def test_round_trip_every_contract(tmp_path: Path) -> None:
    cases = [
        (
            INSTRUCTIONS,
            [rec(0), rec(1, origin="asd", source_id="t-train-00000", style="yes_no", answer="Yes")],
        ),
        (
            REJECTS,
            [RejectRecord("t-train-00002", "01-scienceqa", "asd", "distractor equals answer", '{"x": 1}')],
        ),
        (
            PREDICTIONS,
            [PredictionRecord("sefe", 2, "01-scienceqa", "t-test-00000", "mcq", "A", "B", 0.0, True, False)],
        ),
        (
            METRIC_TABLE,
            [MetricRecord("sefe", "accuracy", "MFN", 0.5), MetricRecord("sefe", "format", "BWT", -0.25)],
        ),
    ]
    for contract, records in cases:
        path = tmp_path / f"{contract.name}.parquet"
        info = contract.write(records, path)
        assert info.bytes == path.stat().st_size and len(info.sha256) == 64
        assert contract.read_records(path) == records
        assert pq.read_schema(path).metadata[b"sefe.contract"] == contract.name.encode()


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=40, deadline=None)
@given(
    question=text,
    answer=text,
    style=st.sampled_from(STYLES),
    meta=st.dictionaries(st.text(max_size=5), st.integers()),
)
def test_instruction_round_trip_any_text(
    tmp_path_factory, question: str, answer: str, style: str, meta: dict
) -> None:
    path = tmp_path_factory.mktemp("rt") / "x.parquet"
    r = rec(question=question, answer=answer, style=style, meta=json.dumps(meta))
    INSTRUCTIONS.write([r], path)
    assert INSTRUCTIONS.read_records(path) == [r]


def _expect(path: Path, row, field: str, fn) -> ContractError:
    with pytest.raises(ContractError) as ei:
        fn()
    err = ei.value
    assert (err.source, err.row, err.field) == (str(path), row, field), str(err)
    assert str(path) in str(err) and field in str(err)
    assert not path.exists(), "a failed write must leave no file"
    assert not list(path.parent.glob(".*tmp*")), "no temp file left behind"
    return err


@pytest.mark.parametrize(
    "bad, row, field",
    [
        ([rec(0), rec(1, style="haiku")], 1, "style"),
        ([rec(0), rec(1, origin="generated")], 1, "origin"),
        ([rec(0), rec(1), rec(2, id="t-train-00000")], 2, "id"),
        ([rec(0, meta="{not json")], 0, "meta"),
        ([rec(0, meta="[1, 2]")], 0, "meta"),
        ([rec(0, image="/abs/path.png")], 0, "image"),
        ([rec(0, image="../escape.png")], 0, "image"),
        ([rec(0), {**rec(1).__dict__, "answer": 3}], 1, "answer"),
        ([rec(0), {**rec(1).__dict__, "question": None}], 1, "question"),
        ([{k: v for k, v in rec(0).__dict__.items() if k != "task"}], 0, "task"),
    ],
    ids=[
        "unknown-style",
        "unknown-origin",
        "duplicate-id",
        "bad-json",
        "json-not-object",
        "absolute-image",
        "escaping-image",
        "wrong-type",
        "null",
        "missing-field",
    ],
)
def test_bad_records_on_write(tmp_path: Path, bad, row: int, field: str) -> None:
    path = tmp_path / "bad.parquet"
    _expect(path, row, field, lambda: INSTRUCTIONS.write(bad, path))


def _write_raw(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)


def test_bad_files_on_read(tmp_path: Path) -> None:
    good = INSTRUCTIONS.table([rec(0), rec(1), rec(2)])
    cases = {
        "missing-column": (good.drop_columns(["answer"]), None, "answer"),
        "wrong-type": (
            good.set_column(good.schema.get_field_index("answer"), "answer", pa.array([1, 2, 3], pa.int64())),
            0,
            "answer",
        ),
        "unknown-style": (
            good.set_column(good.schema.get_field_index("style"), "style", pa.array(["mcq", "mcq", "poem"])),
            2,
            "style",
        ),
        "duplicate-id": (good.set_column(0, "id", pa.array(["a", "b", "a"])), 2, "id"),
        "unknown-column": (good.append_column("extra", pa.array([1, 2, 3])), None, "extra"),
    }
    for name, (table, row, field) in cases.items():
        path = tmp_path / f"{name}.parquet"
        _write_raw(path, table)
        with pytest.raises(ContractError) as ei:
            INSTRUCTIONS.read(path)
        assert (ei.value.row, ei.value.field) == (row, field), name
        assert str(path) in str(ei.value)


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(ContractError, match="corrupt.parquet"):
        INSTRUCTIONS.read(bad)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        INSTRUCTIONS.read(tmp_path / "nope.parquet")


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "keep.parquet"
    INSTRUCTIONS.write([rec(0)], path)
    before = path.read_bytes()
    with pytest.raises(ContractError):
        INSTRUCTIONS.write([rec(0), rec(0)], path)
    assert path.read_bytes() == before
