"""docs/sql.md documents every table and column of db/models.py (name, type, nullability)
and every column of the views of db/schema.py: the public SQL interface and its page
must not drift apart."""
from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import JSON, BigInteger, DateTime, Float, Integer, String, Text, inspect

from db.engine import make_engine
from db.models import Base
from db.schema import VIEWS, ensure_schema

DOC = Path(__file__).resolve().parents[2] / "docs" / "sql.md"


def _sections() -> dict[str, list[list[str]]]:
    """`### `name`` section -> the cells of its table rows (header and rule left out)."""
    sections: dict[str, list[list[str]]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"#{2,3} `(\w+)`", line)
        if heading:
            current = sections.setdefault(heading.group(1), [])
        elif line.startswith("#"):
            current = None
        elif current is not None and line.startswith("| `"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return sections


def _documented_type(column) -> str:
    kind = column.type
    if isinstance(kind, BigInteger):
        name = "bigint"
    elif isinstance(kind, Integer):
        name = "integer"
    elif isinstance(kind, Float):
        name = "float"
    elif isinstance(kind, Text):
        name = "text"
    elif isinstance(kind, String):
        name = f"varchar({kind.length})"
    elif isinstance(kind, JSON):
        name = "json"
    elif isinstance(kind, DateTime):
        name = "timestamp"
    else:
        raise AssertionError(f"{column}: type {kind!r} has no documented name")
    return f"`{name} NULL`" if column.nullable else f"`{name}`"


def test_every_table_column_is_documented_with_its_type_and_nullability():
    sections = _sections()
    for table in Base.metadata.sorted_tables:
        assert table.name in sections, f"docs/sql.md has no section for {table.name}"
        documented = {row[0].strip("`"): row[1] for row in sections[table.name]}
        expected = {column.name: _documented_type(column) for column in table.columns}
        assert documented == expected, table.name


def test_every_view_column_is_documented(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'views.db'}")
    ensure_schema(engine)
    sections = _sections()
    for view in VIEWS:
        columns = [column["name"] for column in inspect(engine).get_columns(view)]
        documented = [name.strip().strip("`") for row in sections[view]
                      for name in row[0].split(",")]
        assert documented == columns, view
