"""The issuance hot path's SQL on the driver cursor, skipping SQLAlchemy's per-statement
execution machinery (which costs more than the statements themselves).

Values are converted with the column types' own bind and result processors, so what lands
in the database is exactly what SQLAlchemy would have written, and reads back the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Column, Connection, Table
from sqlalchemy.engine import Dialect

Processor = Callable[[Any], Any] | None


def _marker(dialect: Dialect) -> str:
    return "%s" if dialect.paramstyle in ("format", "pyformat") else "?"


def _convert(values: Sequence[Any], processors: Sequence[Processor]) -> tuple[Any, ...]:
    return tuple(
        process(value) if process is not None and value is not None else value
        for value, process in zip(values, processors, strict=True)
    )


class FastInsert:
    """``INSERT INTO table (every column but ``generated``) VALUES (...)``."""

    def __init__(self, table: Table, dialect: Dialect, generated: str | None = None) -> None:
        self.columns = [c.name for c in table.columns if c.name != generated]
        marker = _marker(dialect)
        # Table and column names come from schema.py, never from input.
        names, markers = ", ".join(self.columns), ", ".join(marker for _ in self.columns)
        self.sql = f"INSERT INTO {table.name} ({names}) VALUES ({markers})"  # noqa: S608
        self.generated = generated
        self.processors = [
            table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in self.columns
        ]

    def execute(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        """Insert ``rows``; returns the generated ids in order (when ``generated`` is set)."""
        values = [_convert([r[name] for name in self.columns], self.processors) for r in rows]
        cursor = conn.connection.cursor()
        try:
            if not self.generated:
                cursor.executemany(self.sql, values)
                return []
            ids = []
            sql = f"{self.sql} RETURNING {self.generated}"
            for row in values:  # RETURNING with executemany differs between drivers
                cursor.execute(sql, row)
                generated = cursor.fetchone()
                assert generated is not None
                ids.append(int(generated[0]))
            return ids
        finally:
            cursor.close()


class FastQuery:
    """A fixed statement with positional parameters, results converted per column type."""

    def __init__(
        self,
        sql: str,
        dialect: Dialect,
        parameters: Sequence[Column[Any]] = (),
        results: Sequence[Column[Any]] = (),
    ) -> None:
        self.sql = sql.replace("?", _marker(dialect))
        self.parameters = [c.type.dialect_impl(dialect).bind_processor(dialect) for c in parameters]
        self.results: list[Processor] = [
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in results
        ]

    def rows(self, conn: Connection, *values: Any) -> list[tuple[Any, ...]]:
        cursor = conn.connection.cursor()
        try:
            cursor.execute(self.sql, _convert(values, self.parameters))
            fetched = cursor.fetchall() if self.results else []
        finally:
            cursor.close()
        return [_convert(row, self.results) for row in fetched]
