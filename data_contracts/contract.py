"""Contract machinery: one typed record class -> one Arrow schema -> validated, atomic Parquet I/O.

A contract is declared once, as a frozen dataclass whose field metadata carries the rules
(enum values, JSON text, uniqueness). The Arrow schema is derived from it, so the record type
and the file format can never drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_contracts.atomic import FileInfo, atomic_path, file_info

R = TypeVar("R")

_ARROW_TYPES: dict[type, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
}


class ContractError(ValueError):
    """A table breaks its contract. Names the file, the row and the field so a user can fix it."""

    def __init__(self, source: str, row: int | None, field: str, message: str):
        self.source, self.row, self.field = source, row, field
        where = "all rows" if row is None else f"row {row}"
        super().__init__(f"{source}: {where}, field '{field}': {message}")


def enum(*values: str) -> dict[str, Any]:
    """Field metadata: the value must be one of `values`."""
    return {"enum": frozenset(values)}


JSON_OBJECT = {"json": True}
UNIQUE = {"unique": True}
RELATIVE_PATH = {"relative_path": True}


@dataclass(frozen=True)
class _Field:
    name: str
    py_type: type
    arrow_type: pa.DataType
    nullable: bool
    enum: frozenset[str] | None
    json: bool
    unique: bool
    relative_path: bool


def _fields_of(record: type) -> list[_Field]:
    hints = typing.get_type_hints(record)
    out = []
    for f in dataclasses.fields(record):
        hint = hints[f.name]
        nullable = False
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            nullable, hint = True, args[0]
        out.append(
            _Field(
                name=f.name,
                py_type=hint,
                arrow_type=_ARROW_TYPES[hint],
                nullable=nullable,
                enum=f.metadata.get("enum"),
                json=bool(f.metadata.get("json")),
                unique=bool(f.metadata.get("unique")),
                relative_path=bool(f.metadata.get("relative_path")),
            )
        )
    return out


class Contract(Generic[R]):
    """Schema, validation and Parquet I/O for one artifact kind.

    `unique_key` lists columns whose combination must be unique (defaults to the fields marked
    UNIQUE). Every read and every write validates; a failed write leaves no file behind.
    """

    def __init__(self, name: str, record: type[R], unique_key: Sequence[str] | None = None):
        self.name = name
        self.record = record
        self.fields = _fields_of(record)
        self.schema = pa.schema(
            [pa.field(f.name, f.arrow_type, nullable=f.nullable) for f in self.fields],
            metadata={b"sefe.contract": name.encode()},
        )
        marked = [f.name for f in self.fields if f.unique]
        self.unique_key: tuple[str, ...] = tuple(unique_key) if unique_key is not None else tuple(marked)

    # -- building -------------------------------------------------------------------------
    def table(self, records: Iterable[R | dict[str, Any]], source: str = "<records>") -> pa.Table:
        """Build a validated table from records or dicts; type errors name their row."""
        rows: list[dict[str, Any]] = []
        for i, rec in enumerate(records):
            row = dataclasses.asdict(rec) if dataclasses.is_dataclass(rec) else dict(rec)
            for f in self.fields:
                if f.name not in row:
                    raise ContractError(source, i, f.name, "missing")
                v = row[f.name]
                if v is None:
                    if not f.nullable:
                        raise ContractError(source, i, f.name, "null in a non-nullable field")
                    continue
                ok = isinstance(v, f.py_type) and not (f.py_type is not bool and isinstance(v, bool))
                if f.py_type is float and isinstance(v, int) and not isinstance(v, bool):
                    ok, row[f.name] = True, float(v)
                if not ok:
                    raise ContractError(
                        source, i, f.name, f"expected {f.py_type.__name__}, got {type(v).__name__} {v!r:.60}"
                    )
            extra = set(row) - {f.name for f in self.fields}
            if extra:
                raise ContractError(source, i, sorted(extra)[0], "not a field of " + self.name)
            rows.append(row)
        table = pa.Table.from_pylist(rows, schema=self.schema)
        return self.validate(table, source)

    # -- validation -----------------------------------------------------------------------
    def validate(self, table: pa.Table, source: str) -> pa.Table:
        """Check columns, types, nulls, enums, JSON and uniqueness; return the table in schema order."""
        names = set(table.column_names)
        for f in self.fields:
            if f.name not in names:
                raise ContractError(source, None, f.name, f"missing column (contract {self.name})")
        for extra in table.column_names:
            if extra not in {f.name for f in self.fields}:
                raise ContractError(source, None, extra, f"unknown column (contract {self.name})")
        for f in self.fields:
            col = table.column(f.name)
            if not col.type.equals(f.arrow_type):
                first = _first_index(pc.is_valid(col))
                raise ContractError(source, first, f.name, f"wrong type {col.type}, expected {f.arrow_type}")
            if not f.nullable and col.null_count:
                raise ContractError(
                    source, _first_index(pc.is_null(col)), f.name, "null in a non-nullable field"
                )
            if f.enum is not None:
                bad = pc.invert(pc.is_in(col, value_set=pa.array(sorted(f.enum))))
                bad = pc.and_(bad, pc.is_valid(col))
                i = _first_index(bad)
                if i is not None:
                    raise ContractError(
                        source, i, f.name, f"unknown value {col[i].as_py()!r}; allowed: {sorted(f.enum)}"
                    )
            if f.json:
                for i, v in enumerate(col.to_pylist()):
                    if v is None:
                        continue
                    try:
                        obj = json.loads(v)
                    except json.JSONDecodeError as e:
                        raise ContractError(source, i, f.name, f"not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict):
                        raise ContractError(source, i, f.name, "JSON must be an object")
            if f.relative_path:
                for i, v in enumerate(col.to_pylist()):
                    if v is not None and (v.startswith("/") or ".." in v.split("/") or not v):
                        raise ContractError(
                            source, i, f.name, f"must be a path relative to the root, got {v!r}"
                        )
        if self.unique_key:
            keys = list(zip(*(table.column(k).to_pylist() for k in self.unique_key), strict=True))
            seen: dict[tuple, int] = {}
            for i, key in enumerate(keys):
                if key in seen:
                    raise ContractError(
                        source,
                        i,
                        ",".join(self.unique_key),
                        f"duplicate {key!r:.80} (first at row {seen[key]})",
                    )
                seen[key] = i
        return table.select([f.name for f in self.fields]).replace_schema_metadata(self.schema.metadata)

    # -- I/O ------------------------------------------------------------------------------
    def read(self, path: str | Path) -> pa.Table:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such {self.name} file")
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise ContractError(str(path), None, "*", f"not a readable Parquet file ({e})") from e
        return self.validate(table, str(path))

    def read_records(self, path: str | Path) -> list[R]:
        return self.records(self.read(path))

    def records(self, table: pa.Table) -> list[R]:
        return [self.record(**row) for row in table.to_pylist()]

    def write(self, data: pa.Table | Iterable[R | dict[str, Any]], path: str | Path) -> FileInfo:
        """Validate, then write atomically: either the whole valid file appears or nothing does."""
        path = Path(path)
        table = self.validate(data, str(path)) if isinstance(data, pa.Table) else self.table(data, str(path))
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return file_info(path)


def _first_index(mask: pa.ChunkedArray | pa.Array) -> int | None:
    idx = pc.indices_nonzero(pc.fill_null(mask, False))
    return int(idx[0].as_py()) if len(idx) else None
