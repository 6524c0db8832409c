"""The issuance hot path's SQL on the driver cursor, skipping SQLAlchemy's per-statement
execution machinery (which costs more than the statements themselves).

Values are converted with the column types' own bind and result processors, so what lands
in the database is exactly what SQLAlchemy would have written, and reads back the same.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Column, Connection, Engine, Select, Table, UniqueConstraint
from sqlalchemy.engine import Dialect

Processor = Callable[[Any], Any] | None


def _marker(dialect: Dialect) -> str:
    return "%s" if dialect.paramstyle in ("format", "pyformat") else "?"


# Rows per multi-row INSERT: far below SQLite's 32766 and PostgreSQL's 65535 parameters.
MAX_ROWS_PER_INSERT = 256


def _convert(values: Sequence[Any], processors: Sequence[Processor]) -> tuple[Any, ...]:
    return tuple(
        process(value) if process is not None and value is not None else value
        for value, process in zip(values, processors, strict=True)
    )


def _unique_key(table: Table) -> list[str]:
    """The columns of the table's first unique constraint (how returned ids find their rows)."""
    for constraint in table.constraints:
        if isinstance(constraint, UniqueConstraint):
            return [column.name for column in constraint.columns]
    return []


class FastInsert:
    """``INSERT INTO table (every column but ``generated``) VALUES (...)``; ``returns_ids``:
    whether :meth:`execute` reads the generated ids back (one multi-row statement) or
    leaves them (the rows in one executemany)."""

    def __init__(
        self,
        table: Table,
        dialect: Dialect,
        generated: str | None = None,
        *,
        returns_ids: bool = True,
    ) -> None:
        self.columns = [c.name for c in table.columns if c.name != generated]
        marker = _marker(dialect)
        # Table and column names come from schema.py, never from input.
        names, markers = ", ".join(self.columns), ", ".join(marker for _ in self.columns)
        self.sql = f"INSERT INTO {table.name} ({names}) VALUES ({markers})"  # noqa: S608
        self.generated = generated if returns_ids else None
        self._head = f"INSERT INTO {table.name} ({names}) VALUES "  # noqa: S608
        self._row_markers = f"({markers})"
        self.key = _unique_key(table) if self.generated else []
        self._key_positions = [self.columns.index(name) for name in self.key]
        self.processors = [
            table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in self.columns
        ]
        # Only the columns whose type converts values (datetimes on SQLite, ...) need a call.
        self._converting = [(i, p) for i, p in enumerate(self.processors) if p is not None]

    def _values(self, row: Mapping[str, Any]) -> list[Any]:
        values = [row[name] for name in self.columns]
        for index, process in self._converting:
            if values[index] is not None:
                values[index] = process(values[index])
        return values

    def execute(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        """Insert ``rows``; returns the generated ids in order (when ``generated`` is set)."""
        values = [self._values(r) for r in rows]
        cursor = conn.connection.cursor()
        try:
            if not self.generated:
                cursor.executemany(self.sql, values)
                return []
            ids: list[int] = []
            for start in range(0, len(values), MAX_ROWS_PER_INSERT):
                ids += self._insert_returning(cursor, values[start : start + MAX_ROWS_PER_INSERT])
            return ids
        finally:
            cursor.close()

    def _insert_returning(self, cursor: Any, values: Sequence[list[Any]]) -> list[int]:
        """One multi-row INSERT (one statement, one round trip) returning the generated ids.

        Neither SQLite nor PostgreSQL promises RETURNING rows in VALUES order, so each id is
        matched to its row by the table's unique key.
        """
        if not self.key and len(values) > 1:  # nothing to match ids by: one row per statement
            return [i for row in values for i in self._insert_returning(cursor, [row])]
        sql = (
            self._head
            + ", ".join(self._row_markers for _ in values)
            + f" RETURNING {', '.join([self.generated or '', *self.key])}"
        )
        cursor.execute(sql, [value for row in values for value in row])
        returned = cursor.fetchall()
        if not self.key:
            return [int(returned[0][0])]
        by_key = {tuple(r[1:]): int(r[0]) for r in returned}
        return [by_key[tuple(row[i] for i in self._key_positions)] for row in values]


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

    def changed(self, conn: Connection, *values: Any) -> int:
        """Run a statement that returns no rows (an UPDATE); the number of rows changed."""
        cursor = conn.connection.cursor()
        try:
            cursor.execute(self.sql, _convert(values, self.parameters))
            return int(cursor.rowcount)
        finally:
            cursor.close()


class FastSelect:
    """A fixed SELECT written with SQLAlchemy (named ``bindparam``s), compiled once per
    dialect and run on the driver cursor: for reads done on every request, where building
    the statement, its cache key and SQLAlchemy's result machinery cost more than the
    query. Rows are named tuples of the selected columns, values converted by the column
    types as SQLAlchemy would."""

    def __init__(self, statement: Select[Any]) -> None:
        self.statement = statement
        self._row = namedtuple("Row", [c.key for c in statement.selected_columns])  # type: ignore[misc]
        self._compiled: dict[str, _CompiledSelect] = {}

    def rows(self, conn: Connection, **values: Any) -> list[Any]:
        return self._rows(conn.connection, conn.dialect, values)

    def first(self, conn: Connection, **values: Any) -> Any | None:
        found = self.rows(conn, **values)
        return found[0] if found else None

    def first_alone(self, engine: Engine, **values: Any) -> Any | None:
        """:meth:`first` outside any transaction (see :meth:`rows_alone`)."""
        found = self.rows_alone(engine, **values)
        return found[0] if found else None

    def rows_alone(self, engine: Engine, **values: Any) -> list[Any]:
        """:meth:`rows` outside any transaction, on a pooled driver connection: for a
        read that is one SELECT on its own (consistent by itself), where SQLAlchemy's
        connection and transaction cost twice the query. SQLite runs it in autocommit
        mode; whatever PostgreSQL's driver began is rolled back when the connection goes
        back to the pool (as the OCSP responder's ``single_read``)."""
        driver = engine.raw_connection()
        try:
            return self._rows(driver, engine.dialect, values)
        finally:
            driver.close()

    def _rows(self, driver: Any, dialect: Dialect, values: Mapping[str, Any]) -> list[Any]:
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = _CompiledSelect(self.statement, dialect)
        cursor = driver.cursor()
        try:
            cursor.execute(compiled.sql, compiled.parameters(values))
            fetched = cursor.fetchall()
        finally:
            cursor.close()
        row = self._row
        return [row(*_convert(r, compiled.results)) for r in fetched]

    def driver_rows(self, conn: Connection, **values: Any) -> list[tuple[Any, ...]]:
        """The rows as the driver returns them, no value converted: for bulk reads whose
        caller takes the driver's types (a million CRL entries)."""
        dialect = conn.dialect
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = _CompiledSelect(self.statement, dialect)
        cursor = conn.connection.cursor()
        try:
            cursor.execute(compiled.sql, compiled.parameters(values))
            return cast(list[tuple[Any, ...]], cursor.fetchall())
        finally:
            cursor.close()


class _CompiledSelect:
    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self._compiled = compiled
        self._positions = list(compiled.positiontup or ()) if compiled.positional else None
        self._processors: dict[str, Processor] = {
            name: bind.type.dialect_impl(dialect).bind_processor(dialect)
            for name, bind in compiled.binds.items()
        }
        self.results: list[Processor] = [
            c.type.dialect_impl(dialect).result_processor(dialect, None)
            for c in statement.selected_columns
        ]

    def parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | Mapping[str, Any]:
        params = self._compiled.construct_params(values)
        for name, value in params.items():
            process = self._processors.get(name)
            if process is not None and value is not None:
                params[name] = process(value)
        if self._positions is None:
            return params
        return [params[name] for name in self._positions]
