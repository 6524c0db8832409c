"""The ACME connector's SQL: accounts, EAB keys, orders, authorizations, challenges, spent
nonces and rate-limit counters.

Every function takes the caller's connection, so the caller decides what commits together
(a challenge's result, its authorization's and its order's new status commit as one).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    Update,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    select,
    text,
    update,
)

from pkigate.core.store import IntegrityError, as_utc, schema
from pkigate.core.store.fastpath import FastSelect


def _utc(moment: datetime | None) -> datetime:
    value = as_utc(moment)
    assert value is not None
    return value


# -- nonces ------------------------------------------------------------------------------


def next_nonce_generation(conn: Connection) -> int:
    """Bump the durable nonce generation counter (the caller's commit makes it durable)."""
    g = schema.acme_nonce_generations.c
    bumped = conn.execute(
        update(schema.acme_nonce_generations)
        .where(g.id == 1)
        .values(generation=g.generation + 1)
        .returning(g.generation)
    ).scalar_one_or_none()
    if bumped is not None:
        return int(bumped)
    conn.execute(insert(schema.acme_nonce_generations).values(id=1, generation=1))
    return 1


def live_nonce_generation(conn: Connection) -> int | None:
    e = schema.acme_nonce_epoch.c
    value = conn.execute(select(e.generation).where(e.id == 1)).scalar_one_or_none()
    return int(value) if value is not None else None


def install_nonce_generation(conn: Connection, generation: int, *, replace: bool) -> int:
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    e = schema.acme_nonce_epoch.c
    statement = pg_insert(schema.acme_nonce_epoch).values(id=1, generation=generation)
    if replace:
        statement = statement.on_conflict_do_update(
            index_elements=[e.id], set_={"generation": generation}
        )
    else:
        statement = statement.on_conflict_do_nothing(index_elements=[e.id])
    conn.execute(statement)
    live = live_nonce_generation(conn)
    assert live is not None
    return live


_SPEND_NONCE = text(
    "INSERT INTO acme_spent_nonces (nonce, generation, expires_at)"
    " SELECT :nonce, :generation, :expires_at WHERE EXISTS"
    " (SELECT 1 FROM acme_nonce_epoch WHERE id = 1 AND generation = :generation)"
    " ON CONFLICT (nonce) DO NOTHING"
)


def spend_nonce(conn: Connection, nonce: str, generation: int, expires_at: datetime) -> bool:
    """Record ``nonce`` as used if ``generation`` is live; False when it is not, or when the
    nonce was used before (a replay). PostgreSQL."""
    result = conn.execute(
        _SPEND_NONCE, {"nonce": nonce, "generation": generation, "expires_at": expires_at}
    )
    return result.rowcount == 1


def purge_spent_nonces(conn: Connection, now: datetime) -> int:
    c, e = schema.acme_spent_nonces.c, schema.acme_nonce_epoch.c
    live = select(e.generation).where(e.id == 1).scalar_subquery()
    return conn.execute(
        delete(schema.acme_spent_nonces).where(
            (c.expires_at < now) | (c.generation != func.coalesce(live, -1))
        )
    ).rowcount


# -- accounts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountRecord:
    id: str
    connector: str
    thumbprint: str
    jwk: dict[str, Any]
    status: str
    contact: tuple[str, ...]
    eab_key_id: str | None
    created_at: datetime


def _account(row: Any) -> AccountRecord:
    return AccountRecord(
        row.id,
        row.connector,
        row.thumbprint,
        json.loads(row.jwk),
        row.status,
        tuple(json.loads(row.contact)),
        row.eab_key_id,
        _utc(row.created_at),
    )


_ACCOUNT_BY_ID = FastSelect(
    select(schema.acme_accounts).where(
        schema.acme_accounts.c.id == bindparam("id"),
        schema.acme_accounts.c.connector == bindparam("connector"),
    )
)


def account_by_id(conn: Connection, connector: str, account_id: str) -> AccountRecord | None:
    row = _ACCOUNT_BY_ID.first(conn, id=account_id, connector=connector)
    return None if row is None else _account(row)


def account_by_id_alone(engine: Engine, connector: str, account_id: str) -> AccountRecord | None:
    """:func:`account_by_id` as a read of its own (every JWS request signed with a kid)."""
    row = _ACCOUNT_BY_ID.first_alone(engine, id=account_id, connector=connector)
    return None if row is None else _account(row)


def account_by_thumbprint(
    conn: Connection, connector: str, thumbprint: str
) -> AccountRecord | None:
    c = schema.acme_accounts.c
    row = conn.execute(
        select(schema.acme_accounts).where(c.connector == connector, c.thumbprint == thumbprint)
    ).first()
    return None if row is None else _account(row)


def accounts(conn: Connection, connector: str, limit: int) -> list[AccountRecord]:
    """A connector's newest accounts first (the console's list)."""
    c = schema.acme_accounts.c
    rows = conn.execute(
        select(schema.acme_accounts)
        .where(c.connector == connector)
        .order_by(c.created_at.desc())
        .limit(limit)
    )
    return [_account(row) for row in rows]


def insert_account(conn: Connection, record: AccountRecord) -> None:
    conn.execute(
        insert(schema.acme_accounts).values(
            id=record.id,
            connector=record.connector,
            thumbprint=record.thumbprint,
            jwk=json.dumps(record.jwk, sort_keys=True),
            status=record.status,
            contact=json.dumps(list(record.contact)),
            eab_key_id=record.eab_key_id,
            created_at=record.created_at,
            updated_at=record.created_at,
        )
    )


def update_account(
    conn: Connection,
    account_id: str,
    now: datetime,
    *,
    status: str | None = None,
    contact: Sequence[str] | None = None,
    jwk: dict[str, Any] | None = None,
    thumbprint: str | None = None,
) -> None:
    values: dict[str, Any] = {"updated_at": now}
    if status is not None:
        values["status"] = status
    if contact is not None:
        values["contact"] = json.dumps(list(contact))
    if jwk is not None:
        values["jwk"] = json.dumps(jwk, sort_keys=True)
        values["thumbprint"] = thumbprint
    c = schema.acme_accounts.c
    conn.execute(update(schema.acme_accounts).where(c.id == account_id).values(**values))


# -- external account binding keys ---------------------------------------------------------


@dataclass(frozen=True)
class EabKeyRecord:
    id: str
    connector: str
    sealed_key: bytes
    label: str | None
    allowed_identifiers: dict[str, Any] | None
    default_profile: str | None
    created_at: datetime
    created_by: str
    account_id: str | None
    bound_at: datetime | None
    revoked_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        def stamp(moment: datetime | None) -> str | None:
            return None if moment is None else moment.isoformat().replace("+00:00", "Z")

        return {
            "kid": self.id,
            "label": self.label,
            "allowed_identifiers": self.allowed_identifiers,
            "default_profile": self.default_profile,
            "created_at": stamp(self.created_at),
            "created_by": self.created_by,
            "account_id": self.account_id,
            "bound_at": stamp(self.bound_at),
            "revoked_at": stamp(self.revoked_at),
        }


def _eab(row: Any) -> EabKeyRecord:
    return EabKeyRecord(
        row.id,
        row.connector,
        bytes(row.sealed_key),
        row.label,
        None if row.allowed_identifiers is None else json.loads(row.allowed_identifiers),
        row.default_profile,
        _utc(row.created_at),
        row.created_by,
        row.account_id,
        as_utc(row.bound_at),
        as_utc(row.revoked_at),
    )


def insert_eab_key(conn: Connection, record: EabKeyRecord) -> None:
    conn.execute(
        insert(schema.acme_eab_keys).values(
            id=record.id,
            connector=record.connector,
            sealed_key=record.sealed_key,
            label=record.label,
            allowed_identifiers=None
            if record.allowed_identifiers is None
            else json.dumps(record.allowed_identifiers, sort_keys=True),
            default_profile=record.default_profile,
            created_at=record.created_at,
            created_by=record.created_by,
        )
    )


def eab_key(conn: Connection, connector: str, key_id: str) -> EabKeyRecord | None:
    c = schema.acme_eab_keys.c
    row = conn.execute(
        select(schema.acme_eab_keys).where(c.id == key_id, c.connector == connector)
    ).first()
    return None if row is None else _eab(row)


def eab_keys(conn: Connection, connector: str) -> list[EabKeyRecord]:
    c = schema.acme_eab_keys.c
    rows = conn.execute(
        select(schema.acme_eab_keys).where(c.connector == connector).order_by(c.created_at, c.id)
    ).all()
    return [_eab(row) for row in rows]


def bind_eab_key(conn: Connection, key_id: str, account_id: str, now: datetime) -> bool:
    """Bind the key to its first account; False when it is bound already or revoked."""
    c = schema.acme_eab_keys.c
    result = conn.execute(
        update(schema.acme_eab_keys)
        .where(c.id == key_id, c.account_id.is_(None), c.revoked_at.is_(None))
        .values(account_id=account_id, bound_at=now)
    )
    return result.rowcount == 1


def revoke_eab_key(conn: Connection, connector: str, key_id: str, now: datetime) -> bool:
    c = schema.acme_eab_keys.c
    result = conn.execute(
        update(schema.acme_eab_keys)
        .where(c.id == key_id, c.connector == connector, c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return result.rowcount == 1


# -- orders, authorizations, challenges ----------------------------------------------------


@dataclass(frozen=True)
class OrderRecord:
    id: str
    connector: str
    account_id: str
    status: str
    expires_at: datetime
    identifiers: tuple[tuple[str, str], ...]
    profile: str | None
    replaces: str | None
    error: dict[str, Any] | None
    ca_id: str | None
    serial: str | None
    created_at: datetime
    updated_at: datetime


def _order(row: Any) -> OrderRecord:
    return OrderRecord(
        row.id,
        row.connector,
        row.account_id,
        row.status,
        _utc(row.expires_at),
        tuple((i["type"], i["value"]) for i in json.loads(row.identifiers)),
        row.profile,
        row.replaces,
        None if row.error is None else json.loads(row.error),
        row.ca_id,
        row.serial,
        _utc(row.created_at),
        _utc(row.updated_at),
    )


def insert_order(conn: Connection, record: OrderRecord, authorization_ids: Sequence[str]) -> None:
    conn.execute(
        insert(schema.acme_orders).values(
            id=record.id,
            connector=record.connector,
            account_id=record.account_id,
            status=record.status,
            expires_at=record.expires_at,
            identifiers=json.dumps([{"type": t, "value": v} for t, v in record.identifiers]),
            profile=record.profile,
            replaces=record.replaces,
            created_at=record.created_at,
            updated_at=record.updated_at,
        )
    )
    conn.execute(
        insert(schema.acme_order_authorizations),
        [
            {"order_id": record.id, "position": position, "authorization_id": authz_id}
            for position, authz_id in enumerate(authorization_ids)
        ],
    )


_ORDER_BY_ID = FastSelect(
    select(schema.acme_orders).where(
        schema.acme_orders.c.id == bindparam("id"),
        schema.acme_orders.c.connector == bindparam("connector"),
    )
)
_ORDER_AUTHORIZATION_IDS = FastSelect(
    select(schema.acme_order_authorizations.c.authorization_id)
    .where(schema.acme_order_authorizations.c.order_id == bindparam("order_id"))
    .order_by(schema.acme_order_authorizations.c.position)
)


def order_by_id(conn: Connection, connector: str, order_id: str) -> OrderRecord | None:
    row = _ORDER_BY_ID.first(conn, id=order_id, connector=connector)
    return None if row is None else _order(row)


def order_authorization_ids(conn: Connection, order_id: str) -> list[str]:
    return [row.authorization_id for row in _ORDER_AUTHORIZATION_IDS.rows(conn, order_id=order_id)]


def _record_with_its_rows(
    parent: Table, child: Table, link: Any, columns: Sequence[Any], order: Any
) -> FastSelect:
    """``parent``'s row (by ``id`` and ``connector``) joined with the ``columns`` of each
    ``child`` row whose ``link`` names it, in ``order`` (NULLs for a record that lists
    nothing): a record and what it lists in one statement."""
    return FastSelect(
        select(parent, *columns)
        .select_from(parent.outerjoin(child, link == parent.c.id))
        .where(parent.c.id == bindparam("id"), parent.c.connector == bindparam("connector"))
        .order_by(order)
    )


_ORDER_WITH_AUTHORIZATION_IDS = _record_with_its_rows(
    schema.acme_orders,
    schema.acme_order_authorizations,
    schema.acme_order_authorizations.c.order_id,
    [schema.acme_order_authorizations.c.authorization_id.label("listed_authorization_id")],
    schema.acme_order_authorizations.c.position,
)


def order_with_authorization_ids_alone(
    engine: Engine, connector: str, order_id: str
) -> tuple[OrderRecord, list[str]] | None:
    """:func:`order_by_id` and :func:`order_authorization_ids` in one statement of its
    own, consistent without a transaction: what every poll of an order reads."""
    rows = _ORDER_WITH_AUTHORIZATION_IDS.rows_alone(engine, id=order_id, connector=connector)
    if not rows:
        return None
    listed = [row.listed_authorization_id for row in rows if row.listed_authorization_id]
    return _order(rows[0]), listed


def orders_of_account(
    conn: Connection, account_id: str, after: tuple[datetime, str] | None, limit: int
) -> list[OrderRecord]:
    """The account's orders, oldest first, starting after the ``(created_at, id)`` cursor."""
    c = schema.acme_orders.c
    query = select(schema.acme_orders).where(c.account_id == account_id)
    if after is not None:
        query = query.where(
            (c.created_at > after[0]) | and_(c.created_at == after[0], c.id > after[1])
        )
    rows = conn.execute(query.order_by(c.created_at, c.id).limit(limit)).all()
    return [_order(row) for row in rows]


def update_order(
    conn: Connection,
    order_id: str,
    now: datetime,
    *,
    status: str,
    expected_status: str | None = None,
    error: dict[str, Any] | None = None,
    ca_id: str | None = None,
    serial: str | None = None,
) -> bool:
    """Move the order to ``status`` (only from ``expected_status`` when given)."""
    values: dict[str, Any] = {"status": status, "updated_at": now}
    if error is not None:
        values["error"] = json.dumps(error)
    if serial is not None:
        values["ca_id"] = ca_id
        values["serial"] = serial
    query = _update_statement(schema.acme_orders, tuple(values), expected_status is not None)
    return conn.execute(query, _update_parameters(order_id, expected_status, values)).rowcount == 1


def order_for_certificate(conn: Connection, ca_id: str, serial: str) -> OrderRecord | None:
    c = schema.acme_orders.c
    row = conn.execute(
        select(schema.acme_orders).where(c.ca_id == ca_id, c.serial == serial)
    ).first()
    return None if row is None else _order(row)


def orders_replacing(conn: Connection, connector: str, cert_id: str) -> list[OrderRecord]:
    c = schema.acme_orders.c
    rows = conn.execute(
        select(schema.acme_orders).where(c.connector == connector, c.replaces == cert_id)
    ).all()
    return [_order(row) for row in rows]


def count_orders_since(conn: Connection, account_id: str, since: datetime) -> int:
    c = schema.acme_orders.c
    return int(
        conn.execute(
            select(func.count())
            .select_from(schema.acme_orders)
            .where(c.account_id == account_id, c.created_at >= since)
        ).scalar_one()
    )


@dataclass(frozen=True)
class AuthorizationRecord:
    id: str
    connector: str
    account_id: str
    identifier_type: str
    identifier_value: str
    wildcard: bool
    status: str
    expires_at: datetime
    created_at: datetime


def _authorization(row: Any) -> AuthorizationRecord:
    return AuthorizationRecord(
        row.id,
        row.connector,
        row.account_id,
        row.identifier_type,
        row.identifier_value,
        bool(row.wildcard),
        row.status,
        _utc(row.expires_at),
        _utc(row.created_at),
    )


def insert_authorization(conn: Connection, record: AuthorizationRecord) -> None:
    conn.execute(
        insert(schema.acme_authorizations).values(
            id=record.id,
            connector=record.connector,
            account_id=record.account_id,
            identifier_type=record.identifier_type,
            identifier_value=record.identifier_value,
            wildcard=int(record.wildcard),
            status=record.status,
            expires_at=record.expires_at,
            created_at=record.created_at,
            updated_at=record.created_at,
        )
    )


_AUTHORIZATION_BY_ID = FastSelect(
    select(schema.acme_authorizations).where(
        schema.acme_authorizations.c.id == bindparam("id"),
        schema.acme_authorizations.c.connector == bindparam("connector"),
    )
)


def authorization_by_id(
    conn: Connection, connector: str, authz_id: str
) -> AuthorizationRecord | None:
    row = _AUTHORIZATION_BY_ID.first(conn, id=authz_id, connector=connector)
    return None if row is None else _authorization(row)


def authorizations_by_ids(conn: Connection, ids: Sequence[str]) -> dict[str, AuthorizationRecord]:
    c = schema.acme_authorizations.c
    rows = conn.execute(select(schema.acme_authorizations).where(c.id.in_(list(ids)))).all()
    return {row.id: _authorization(row) for row in rows}


_REUSABLE_AUTHORIZATION = FastSelect(
    select(schema.acme_authorizations)
    .where(
        schema.acme_authorizations.c.account_id == bindparam("account_id"),
        schema.acme_authorizations.c.identifier_type == bindparam("identifier_type"),
        schema.acme_authorizations.c.identifier_value == bindparam("identifier_value"),
        schema.acme_authorizations.c.status == "valid",
        schema.acme_authorizations.c.wildcard == bindparam("wildcard"),
        schema.acme_authorizations.c.expires_at > bindparam("valid_after"),
        schema.acme_authorizations.c.created_at > bindparam("created_after"),
    )
    .order_by(schema.acme_authorizations.c.expires_at.desc())
    .limit(1)
)


def reusable_authorization(
    conn: Connection,
    account_id: str,
    identifier_type: str,
    identifier_value: str,
    wildcard: bool,
    valid_after: datetime,
    created_after: datetime,
) -> AuthorizationRecord | None:
    """A valid authorization of the account for the identifier that is still good at
    ``valid_after`` and was created within the reuse window."""
    row = _REUSABLE_AUTHORIZATION.first(
        conn,
        account_id=account_id,
        identifier_type=identifier_type,
        identifier_value=identifier_value,
        wildcard=int(wildcard),
        valid_after=valid_after,
        created_after=created_after,
    )
    return None if row is None else _authorization(row)


def authorizations_of_account_for(
    conn: Connection, account_id: str, identifier_type: str, identifier_value: str, now: datetime
) -> list[AuthorizationRecord]:
    c = schema.acme_authorizations.c
    rows = conn.execute(
        select(schema.acme_authorizations).where(
            c.account_id == account_id,
            c.identifier_type == identifier_type,
            c.identifier_value == identifier_value,
            c.status == "valid",
            c.expires_at > now,
        )
    ).all()
    return [_authorization(row) for row in rows]


def update_authorization(
    conn: Connection,
    authz_id: str,
    now: datetime,
    *,
    status: str,
    expected_status: str | None = None,
    expires_at: datetime | None = None,
) -> bool:
    c = schema.acme_authorizations.c
    values: dict[str, Any] = {"status": status, "updated_at": now}
    if expires_at is not None:
        values["expires_at"] = expires_at
    query = update(schema.acme_authorizations).where(c.id == authz_id)
    if expected_status is not None:
        query = query.where(c.status == expected_status)
    return conn.execute(query.values(**values)).rowcount == 1


_ORDERS_USING_AUTHORIZATION = FastSelect(
    select(schema.acme_order_authorizations.c.order_id)
    .where(schema.acme_order_authorizations.c.authorization_id == bindparam("authorization_id"))
    .distinct()
)


def orders_using_authorization(conn: Connection, authz_id: str) -> list[str]:
    return [
        row.order_id for row in _ORDERS_USING_AUTHORIZATION.rows(conn, authorization_id=authz_id)
    ]


_listed = schema.acme_order_authorizations.alias("listed")
_ORDERS_AUTHORIZED_WITH = FastSelect(
    select(schema.acme_order_authorizations.c.order_id)
    .where(
        schema.acme_order_authorizations.c.authorization_id == bindparam("authorization_id"),
        ~exists()
        .where(
            _listed.c.order_id == schema.acme_order_authorizations.c.order_id,
            schema.acme_authorizations.c.id == _listed.c.authorization_id,
            schema.acme_authorizations.c.status != "valid",
        )
        .correlate(schema.acme_order_authorizations),
    )
    .distinct()
)


def orders_authorized_with(conn: Connection, authz_id: str) -> list[str]:
    """The orders using the authorization whose authorizations are all valid now."""
    return [row.order_id for row in _ORDERS_AUTHORIZED_WITH.rows(conn, authorization_id=authz_id)]


@dataclass(frozen=True)
class ChallengeRecord:
    id: str
    authorization_id: str
    type: str
    token: str
    status: str
    validated_at: datetime | None
    error: dict[str, Any] | None
    validation_record: list[dict[str, Any]] | None


def _challenge(row: Any, prefix: str = "") -> ChallengeRecord:
    """The challenge in ``row``, whose columns are named ``prefix`` + the table's."""

    def value(name: str) -> Any:
        return getattr(row, prefix + name)

    error, record = value("error"), value("validation_record")
    return ChallengeRecord(
        value("id"),
        value("authorization_id"),
        value("type"),
        value("token"),
        value("status"),
        as_utc(value("validated_at")),
        None if error is None else json.loads(error),
        None if record is None else json.loads(record),
    )


def insert_challenges(conn: Connection, records: Sequence[ChallengeRecord], now: datetime) -> None:
    conn.execute(
        insert(schema.acme_challenges),
        [
            {
                "id": r.id,
                "authorization_id": r.authorization_id,
                "type": r.type,
                "token": r.token,
                "status": r.status,
                "updated_at": now,
            }
            for r in records
        ],
    )


_CHALLENGES_OF_ONE = FastSelect(
    select(schema.acme_challenges)
    .where(schema.acme_challenges.c.authorization_id == bindparam("authorization_id"))
    .order_by(schema.acme_challenges.c.type)
)
_CHALLENGE_BY_ID = FastSelect(
    select(schema.acme_challenges).where(schema.acme_challenges.c.id == bindparam("id"))
)


def challenges_of(conn: Connection, authorization_ids: Sequence[str]) -> list[ChallengeRecord]:
    if len(authorization_ids) == 1:  # an authorization's own challenges, on every poll
        own = _CHALLENGES_OF_ONE.rows(conn, authorization_id=authorization_ids[0])
        return [_challenge(row) for row in own]
    c = schema.acme_challenges.c
    rows = conn.execute(
        select(schema.acme_challenges)
        .where(c.authorization_id.in_(list(authorization_ids)))
        .order_by(c.authorization_id, c.type)
    ).all()
    return [_challenge(row) for row in rows]


_AUTHORIZATION_WITH_CHALLENGES = _record_with_its_rows(
    schema.acme_authorizations,
    schema.acme_challenges,
    schema.acme_challenges.c.authorization_id,
    [c.label(f"challenge_{c.name}") for c in schema.acme_challenges.c],
    schema.acme_challenges.c.type,
)


def authorization_with_challenges_alone(
    engine: Engine, connector: str, authz_id: str
) -> tuple[AuthorizationRecord, list[ChallengeRecord]] | None:
    """:func:`authorization_by_id` and its :func:`challenges_of` in one statement of its
    own, consistent without a transaction: what every poll of an authorization reads."""
    rows = _AUTHORIZATION_WITH_CHALLENGES.rows_alone(engine, id=authz_id, connector=connector)
    if not rows:
        return None
    challenges = [_challenge(row, "challenge_") for row in rows if row.challenge_id is not None]
    return _authorization(rows[0]), challenges


def challenge_by_id(conn: Connection, challenge_id: str) -> ChallengeRecord | None:
    row = _CHALLENGE_BY_ID.first(conn, id=challenge_id)
    return None if row is None else _challenge(row)


def update_challenge(
    conn: Connection,
    challenge_id: str,
    now: datetime,
    *,
    status: str,
    expected_status: str | None = None,
    error: dict[str, Any] | None = None,
    validation_record: list[dict[str, Any]] | None = None,
) -> bool:
    values: dict[str, Any] = {"status": status, "updated_at": now}
    if status == "valid":
        values["validated_at"] = now
    if error is not None:
        values["error"] = json.dumps(error)
    if validation_record is not None:
        values["validation_record"] = json.dumps(validation_record)
    query = _update_statement(schema.acme_challenges, tuple(values), expected_status is not None)
    return (
        conn.execute(query, _update_parameters(challenge_id, expected_status, values)).rowcount == 1
    )


@functools.lru_cache(maxsize=64)
def _update_statement(table: Table, columns: tuple[str, ...], checks_status: bool) -> Update:
    """``UPDATE table SET columns... WHERE id = :row_id [AND status = :expected]``, built
    once per shape (updates on every poll and validation)."""
    query = update(table).where(table.c.id == bindparam("row_id"))
    if checks_status:
        query = query.where(table.c.status == bindparam("expected_status"))
    return query.values({name: bindparam(f"new_{name}") for name in columns})


def _update_parameters(
    row_id: str, expected_status: str | None, values: dict[str, Any]
) -> dict[str, Any]:
    parameters = {f"new_{name}": value for name, value in values.items()}
    parameters["row_id"] = row_id
    if expected_status is not None:
        parameters["expected_status"] = expected_status
    return parameters


# -- rate limits -------------------------------------------------------------------------


_RATE_COUNTER = FastSelect(
    select(schema.acme_rate_counters.c.count, schema.acme_rate_counters.c.window_start).where(
        schema.acme_rate_counters.c.connector == bindparam("connector"),
        schema.acme_rate_counters.c.scope == bindparam("scope"),
        schema.acme_rate_counters.c.value == bindparam("value"),
    )
)


def count_in_window(
    conn: Connection, connector: str, scope: str, value: str, window: timedelta, now: datetime
) -> tuple[int, datetime]:
    """The counter's value and the end of its window (0 when no window is open)."""
    row = _RATE_COUNTER.first(conn, connector=connector, scope=scope, value=value)
    if row is None or _utc(row.window_start) + window <= now:
        return 0, now + window
    return int(row.count), _utc(row.window_start) + window


def take_from_window(
    conn: Connection,
    connector: str,
    scope: str,
    value: str,
    window: timedelta,
    now: datetime,
    limit: int,
) -> tuple[bool, datetime]:
    """Count one event unless ``limit`` are counted in the window already: whether it was
    counted, and the end of the window (one read of the counter where
    :func:`count_in_window` then :func:`add_to_window` make two)."""
    row = _RATE_COUNTER.first(conn, connector=connector, scope=scope, value=value)
    if row is not None and _utc(row.window_start) + window > now:
        if int(row.count) >= limit:
            return False, _utc(row.window_start) + window
        add_to_window(conn, connector, scope, value, window, now, row=row)
        return True, _utc(row.window_start) + window
    add_to_window(conn, connector, scope, value, window, now, row=row)
    return True, now + window


def add_to_window(
    conn: Connection,
    connector: str,
    scope: str,
    value: str,
    window: timedelta,
    now: datetime,
    *,
    row: Any | None = None,
) -> int:
    """Count one event; a window that ran out starts again. Returns the new count.
    ``row``: the counter's ``(count, window_start)`` as this transaction just read it."""
    c = schema.acme_rate_counters.c
    key = and_(c.connector == connector, c.scope == scope, c.value == value)
    if row is None:
        row = _RATE_COUNTER.first(conn, connector=connector, scope=scope, value=value)
    if row is None:
        try:
            with conn.begin_nested():
                conn.execute(
                    insert(schema.acme_rate_counters).values(
                        connector=connector, scope=scope, value=value, count=1, window_start=now
                    )
                )
            return 1
        except IntegrityError:
            row = conn.execute(select(c.count, c.window_start).where(key)).first()
            assert row is not None
    if _utc(row[1]) + window <= now:
        conn.execute(update(schema.acme_rate_counters).where(key).values(count=1, window_start=now))
        return 1
    conn.execute(update(schema.acme_rate_counters).where(key).values(count=c.count + 1))
    return int(row[0]) + 1


def purge_rate_counters(conn: Connection, older_than: datetime) -> int:
    c = schema.acme_rate_counters.c
    return conn.execute(
        delete(schema.acme_rate_counters).where(c.window_start < older_than)
    ).rowcount
