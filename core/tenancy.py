"""Teams and CA policies kept in the store, and the decisions of core/access.py applied
to stored CAs: what every front-end calls before it acts on a CA for a token.

Refusals are audited here with their reason (``access.denied``); what is allowed is
audited by the action itself (an issuance records the statement that allowed it).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from pkigate.core.access import (
    DEFAULT_TEAM,
    TEAM_NAME,
    AccessDeniedError,
    Action,
    CAFacts,
    Decision,
    Policy,
    PolicyDocumentError,
    PrincipalFacts,
    RequestFacts,
    decide,
    parse_policy,
    visible,
)
from pkigate.core.audit import Actor, AuditLog
from pkigate.core.errors import BadRequestError, ConflictError, NotFoundError
from pkigate.core.store import CARecord, PolicyRecord, Store, TeamRecord


@dataclass(frozen=True)
class PolicyVersion:
    """One version of a CA's policy (version 0: none was ever set, the empty policy)."""

    ca_id: str
    version: int
    policy: Policy
    record: PolicyRecord | None

    def to_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "ca_id": self.ca_id,
            "version": self.version,
            "sha256": r.sha256 if r else None,
            "document": self.policy.to_json(),
            "created_at": r.created_at.isoformat() if r else None,
            "created_by": r.created_by if r else None,
        }


def canonical(policy: Policy) -> str:
    return json.dumps(policy.to_json(), sort_keys=True, separators=(",", ":"))


class AccessControl:
    def __init__(self, store: Store, audit: AuditLog, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._audit = audit
        self._clock = clock
        # Parsed policies by (CA, version): versions never change once written, so a
        # cached one is never stale; the CA row says which version is current.
        self._policies: dict[tuple[str, int], Policy] = {}
        self._lock = threading.Lock()

    # -- teams ---------------------------------------------------------------------------

    def create_team(self, name: str, actor: Actor) -> TeamRecord:
        if not isinstance(name, str) or not TEAM_NAME.match(name):
            raise BadRequestError(
                "a team name is 1 to 64 lower-case letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        now = self._clock()
        with self._audit.refusals(actor, "team.create", f"team/{name}", now):
            try:
                with self._store.write() as conn:
                    if self._store.get_team(conn, name) is not None:
                        raise ConflictError(f"a team named {name} exists")
                    if self._store.team_has_certificates(conn, name):
                        # Certificates name their team: a new team of that name would
                        # see and revoke what the deleted one asked for.
                        raise ConflictError(
                            f"certificates are recorded as a deleted team {name}'s: "
                            "choose another name"
                        )
                    self._store.insert_team(conn, name, now, actor.principal)
                    self._audit.record(conn, actor, "team.create", f"team/{name}", at=now)
                    record = self._store.get_team(conn, name)
            except IntegrityError:  # a concurrent create of the same name (PostgreSQL)
                raise ConflictError(f"a team named {name} exists") from None
        assert record is not None
        return record

    def delete_team(self, name: str, actor: Actor) -> None:
        """Delete a team that nothing depends on any more: ConflictError naming what does
        (the CAs it owns, its live tokens, the CA policies naming it). The default team
        is never deleted. There is no rename: CAs, tokens, certificates and policies name
        their team."""
        now = self._clock()
        resource = f"team/{name}"
        with self._audit.refusals(actor, "team.delete", resource, now):
            if name == DEFAULT_TEAM:
                raise ConflictError(
                    f"team {DEFAULT_TEAM} is never deleted: it holds what was made before teams"
                )
            with self._store.write() as conn:
                if self._store.get_team(conn, name, lock="update") is None:
                    raise NotFoundError(f"no team named {name}")
                uses = self._uses_of_team(conn, name, now)
                if uses:
                    raise ConflictError(f"team {name} cannot be deleted: {'; '.join(uses)}")
                self._store.delete_team(conn, name)
                self._audit.record(conn, actor, "team.delete", resource, at=now)

    def _uses_of_team(self, conn: Connection, name: str, now: datetime) -> list[str]:
        """What still depends on the team, in words (empty: nothing)."""
        uses = []
        cas = self._store.list_cas(conn)
        owned = [ca.id for ca in cas if ca.team == name]
        if owned:
            uses.append(f"it owns CA {', '.join(owned)} (move or delete them first)")
        live = [
            t.id
            for t in self._store.list_api_tokens(conn)
            if t.team == name
            and t.revoked_at is None
            and (t.expires_at is None or t.expires_at > now)
        ]
        if live:
            uses.append(f"its tokens {', '.join(live)} are live (revoke them first)")
        naming = [
            ca.id
            for ca in cas
            if ca.policy_version
            and any(
                s.team == name for s in self._policy_in(conn, ca.id, ca.policy_version).statements
            )
        ]
        if naming:
            uses.append(f"the policies of CA {', '.join(naming)} name it")
        return uses

    def _policy_in(self, conn: Connection, ca_id: str, version: int) -> Policy:
        """:meth:`_policy` within a transaction already open (a version above 0)."""
        cached = self._policies.get((ca_id, version))
        if cached is None:
            (found,) = self._store.ca_policies(conn, ca_id, version)
            cached = parse_policy(json.loads(found.document))
            with self._lock:
                self._policies[(ca_id, version)] = cached
        return cached

    def list_teams(self) -> list[TeamRecord]:
        with self._store.read() as conn:
            return self._store.list_teams(conn)

    def require_team(self, name: str) -> None:
        with self._store.read() as conn:
            if self._store.get_team(conn, name) is None:
                raise NotFoundError(f"no team named {name}")

    # -- policies ------------------------------------------------------------------------

    def facts(self, record: CARecord) -> CAFacts:
        """The CA as decisions see it: owner and current policy (cached by version)."""
        return self.facts_of(record.id, record.team, record.policy_version)

    def facts_of(self, ca_id: str, team: str, policy_version: int) -> CAFacts:
        return CAFacts(ca_id, team, self._policy(ca_id, policy_version))

    def _policy(self, ca_id: str, version: int) -> Policy:
        if version == 0:
            return Policy()
        cached = self._policies.get((ca_id, version))
        if cached is None:
            with self._store.read() as conn:
                cached = self._policy_in(conn, ca_id, version)
        return cached

    def current_policy(self, ca_id: str) -> PolicyVersion:
        with self._store.read() as conn:
            record = self._store.get_ca(conn, ca_id)
            if record is None:
                raise NotFoundError(f"no CA with id {ca_id}")
            found = self._store.ca_policies(conn, ca_id, record.policy_version)
        stored = found[0] if found else None
        return PolicyVersion(
            ca_id, record.policy_version, self._policy(ca_id, record.policy_version), stored
        )

    def policy_history(self, ca_id: str) -> list[PolicyVersion]:
        with self._store.read() as conn:
            if self._store.get_ca(conn, ca_id) is None:
                raise NotFoundError(f"no CA with id {ca_id}")
            records = self._store.ca_policies(conn, ca_id)
        return [PolicyVersion(ca_id, r.version, self._policy(ca_id, r.version), r) for r in records]

    def set_policy(self, ca_id: str, document: Any, replaces: int, actor: Actor) -> PolicyVersion:
        """Make ``document`` the CA's policy, if ``replaces`` is still its current version
        (otherwise ConflictError: someone changed it since it was read). The CA's version
        moves too, so that signing material cached with the old policy is rebuilt."""
        now = self._clock()
        resource = f"ca/{ca_id}"
        with self._audit.refusals(actor, "ca.policy.set", resource, now, replaces=replaces):
            policy = parse_policy(document)
            text = canonical(policy)
            digest = hashlib.sha256(text.encode()).hexdigest()
            try:
                with self._store.write() as conn:
                    record = self._store.get_ca(conn, ca_id)
                    if record is None:
                        raise NotFoundError(f"no CA with id {ca_id}")
                    if record.policy_version != replaces:
                        raise ConflictError(
                            f"the policy of CA {ca_id} is at version {record.policy_version}, "
                            f"not {replaces}: read it again and resend"
                        )
                    self._require_named_teams(conn, policy)
                    version = replaces + 1
                    self._store.insert_ca_policy(
                        conn,
                        ca_id=ca_id,
                        version=version,
                        document=text,
                        sha256=digest,
                        created_at=now,
                        created_by=actor.principal,
                    )
                    self._store.update_ca(conn, ca_id, policy_version=version, updated_at=now)
                    self._audit.record(
                        conn,
                        actor,
                        "ca.policy.set",
                        resource,
                        at=now,
                        parameters={"version": version, "replaces": replaces, "sha256": digest},
                    )
            except IntegrityError:  # the same version written concurrently (PostgreSQL)
                raise ConflictError(
                    f"the policy of CA {ca_id} changed while this was written; read it again"
                ) from None
        return self.current_policy(ca_id)

    def _require_named_teams(self, conn: Connection, policy: Policy) -> None:
        """Every team the policy names exists now: a statement for a name no team holds
        would grant nothing today (a typo the owner never hears of) and everything to
        whoever later creates a team of that name."""
        for index, statement in enumerate(policy.statements):
            if (
                statement.team is not None
                and self._store.get_team(conn, statement.team, lock="share") is None
            ):
                raise PolicyDocumentError(
                    f"policy statements[{index}].principal.team: no team named {statement.team}"
                )

    # -- decisions -----------------------------------------------------------------------

    def check(
        self,
        principal: PrincipalFacts,
        action: Action,
        ca_id: str,
        actor: Actor,
        request: RequestFacts | None = None,
    ) -> CARecord:
        """The stored CA, if the principal may do ``action`` on it (see :meth:`authorize`)."""
        with self._store.read() as conn:
            record = self._store.get_ca(conn, ca_id)
        if record is None:
            raise NotFoundError(f"no CA with id {ca_id}")
        self.authorize(principal, action, record, actor, request)
        return record

    def authorize(
        self,
        principal: PrincipalFacts,
        action: Action,
        record: CARecord,
        actor: Actor,
        request: RequestFacts | None = None,
    ) -> Decision:
        """The decision, raised as an audited refusal when it is no: NotFoundError for a CA
        the principal may not even see (as if it did not exist), AccessDeniedError with the
        reason otherwise."""
        facts = self.facts(record)
        decision = decide(principal, action, facts, request)
        if decision.allowed:
            return decision
        self._audit.record_alone(
            actor,
            "access.denied",
            f"ca/{record.id}",
            result="failure",
            parameters={"action": action.value, "team": principal.team, "reason": decision.reason},
            at=self._clock(),
        )
        if not visible(principal, facts):
            raise NotFoundError(f"no CA with id {record.id}")
        raise AccessDeniedError(decision.reason)
