"""The store's tables. Changes go through an alembic migration in ``migrations/versions``."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Timestamp = DateTime(timezone=True)

ca_keys = Table(
    "ca_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("backend", String(32), nullable=False),
    Column("algorithm", String(32), nullable=False),
    # Opaque to the store: AES-256-GCM sealed PKCS#8 for the software backend, a token
    # label for PKCS#11. NULL once the key has been destroyed.
    Column("blob", LargeBinary, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("destroyed_at", Timestamp, nullable=True),
)

# Generated secrets that every gateway process and host must agree on (a connector's
# generated static challenge): sealed under the KEK like a CA key, the name bound into the
# ciphertext. A row is written once, by whichever process first needs it.
sealed_secrets = Table(
    "sealed_secrets",
    metadata,
    Column("name", String(256), primary_key=True),
    Column("sealed", LargeBinary, nullable=False),
    Column("created_at", Timestamp, nullable=False),
)

authorities = Table(
    "authorities",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("type", String(16), nullable=False),
    Column("status", String(32), nullable=False),
    Column("status_before_delete", String(32), nullable=True),
    Column("key_id", String(64), ForeignKey("ca_keys.id"), nullable=False),
    Column("key_algorithm", String(32), nullable=False),
    Column("signing_algorithm", String(32), nullable=False),
    Column("usage_mode", String(32), nullable=False),
    Column("subject", Text, nullable=False),
    Column("subject_der", LargeBinary, nullable=False),
    Column("parent_id", String(64), ForeignKey("authorities.id"), nullable=True),
    Column("certificate_der", LargeBinary, nullable=True),
    # DER certificates above this CA's, issuer first, concatenated as PEM.
    Column("chain_pem", Text, nullable=True),
    Column("csr_der", LargeBinary, nullable=True),
    Column("not_before", Timestamp, nullable=True),
    Column("not_after", Timestamp, nullable=True),
    # JSON: CRL/OCSP/AIA URLs, name constraints, backdate, truncate-validity.
    Column("settings", Text, nullable=False, server_default="{}"),
    Column("failure_reason", Text, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Column("deleted_at", Timestamp, nullable=True),
    Column("restore_until", Timestamp, nullable=True),
    # The team that owns the CA (core/access.py), and its policy's current version in
    # ca_policies (0: none). A policy change also moves updated_at, the CA's version.
    Column("team", String(64), nullable=False, server_default="default"),
    Column("policy_version", Integer, nullable=False, server_default="0"),
)

tags = Table(
    "tags",
    metadata,
    Column("resource_id", String(64), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("value", String(256), nullable=False),
)

certificates = Table(
    "certificates",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ca_id", String(64), ForeignKey("authorities.id"), nullable=False),
    # Lower-case hex without leading zeros, as `openssl x509 -serial` shows it.
    Column("serial", String(64), nullable=False),
    Column("subject", Text, nullable=False),
    Column("sans", Text, nullable=False),
    Column("not_before", Timestamp, nullable=False),
    Column("not_after", Timestamp, nullable=False),
    Column("issued_at", Timestamp, nullable=False),
    Column("template", String(128), nullable=False),
    Column("requester", Text, nullable=False),
    Column("connector", String(128), nullable=False),
    Column("correlation_id", String(256), nullable=True),
    Column("status", String(16), nullable=False),
    Column("revoked_at", Timestamp, nullable=True),
    Column("revocation_reason", String(32), nullable=True),
    Column("fingerprint_sha256", String(64), nullable=False),
    Column("der", LargeBinary, nullable=False),
    # The CRL partition named in the certificate's CDP (PARTITIONED CAs only).
    Column("crl_partition", Integer, nullable=True),
    # The team of the token that asked (NULL: the CA owner's, as for device enrollments):
    # a team the CA is shared with sees and revokes only its own certificates.
    Column("team", String(64), nullable=True),
    # While the certificate is revoked: its entry in revokedCertificates (RFC 5280 5.1), DER,
    # encoded once with the revocation (core/crl.py); a CRL is these joined. NULL otherwise.
    Column("crl_entry", LargeBinary, nullable=True),
    UniqueConstraint("ca_id", "serial", name="uq_certificates_ca_serial"),
    Index("ix_certificates_ca_status", "ca_id", "status"),
    Index("ix_certificates_not_after", "not_after"),
    # Holds every column a CRL's read touches, revoked rows only: a million-entry CRL is
    # read from this index in order, never from the rows scattered through the table.
    Index(
        "ix_certificates_crl_entries",
        "ca_id",
        "crl_partition",
        "not_after",
        "crl_entry",
        sqlite_where=text("crl_entry IS NOT NULL"),
        postgresql_where=text("crl_entry IS NOT NULL"),
    ),
)

# Kept by triggers on `certificates` (migration 0013), read by /metrics instead of counting
# a table of millions at every scrape: certificates per CA and status, and unrevoked ones
# per CA and UTC day of notAfter ('YYYY-MM-DD').
certificate_counts = Table(
    "certificate_counts",
    metadata,
    Column("ca_id", String(64), primary_key=True),
    Column("status", String(16), primary_key=True),
    Column("count", BigInteger, nullable=False),
)
certificate_expiry_days = Table(
    "certificate_expiry_days",
    metadata,
    Column("ca_id", String(64), primary_key=True),
    Column("day", String(10), primary_key=True),
    Column("count", BigInteger, nullable=False),
)

idempotency = Table(
    "idempotency",
    metadata,
    Column("scope", String(64), primary_key=True),
    Column("token", String(128), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("result_ref", String(128), nullable=False),
    Column("created_at", Timestamp, nullable=False),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column(
        "seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    ),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("at", Timestamp, nullable=False),
    Column("actor", String(256), nullable=False),
    Column("connector", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("resource", String(256), nullable=False),
    Column("parameters", Text, nullable=False),
    Column("result", String(16), nullable=False),
    Column("request_id", String(64), nullable=True),
    Column("prev_mac", String(64), nullable=False),
    Column("mac", String(64), nullable=False),
    Index("ix_audit_events_resource", "resource"),
)

# One row (id = 1): the last sequence number and MAC. Every append locks it, so the chain
# is extended by one writer at a time, and a truncated tail is detectable.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), nullable=False),
    Column("mac", String(64), nullable=False),
    # MAC of (seq, mac) under the audit key: without the key, the head cannot be moved back
    # to an earlier event to hide a cut-off tail.
    Column("head_mac", String(64), nullable=True),
)

# Management API bearer tokens. Only a SHA-256 of the secret is kept: the secrets are 256
# random bits, so a slow password hash would add nothing but latency to every API call.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(128), nullable=False),
    # Role names separated by spaces (gateways/roles.py), at least one.
    Column("roles", String(256), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("created_by", String(256), nullable=False),
    Column("revoked_at", Timestamp, nullable=True),
    Column("expires_at", Timestamp, nullable=True),  # None: never
    # Written at most once a minute per token (gateways/auth.py LAST_USED_RESOLUTION).
    Column("last_used_at", Timestamp, nullable=True),
    # Client networks (CIDRs) separated by spaces; None: from anywhere.
    Column("allow_from", Text, nullable=True),
    # After a rotation, the replaced secret's digest and until when it still works.
    Column("previous_secret_sha256", String(64), nullable=True),
    Column("previous_secret_until", Timestamp, nullable=True),
    Column("team", String(64), nullable=False, server_default="default"),
)

# Teams (tenants): they hold tokens and own CAs. "default" is made by migration 0018.
teams = Table(
    "teams",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("created_at", Timestamp, nullable=False),
    Column("created_by", String(256), nullable=False),
)

# Every version of every CA's policy document (core/access.py), as canonical JSON; the
# current one is authorities.policy_version.
ca_policies = Table(
    "ca_policies",
    metadata,
    Column("ca_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("document", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("created_by", String(256), nullable=False),
)

# Web console sign-ins (gateways/console.py): in the store so that every worker and host
# behind one name knows them, and a sign-out or a revoked token ends them everywhere. The
# cookie carries the session id; only its SHA-256 is kept (like the tokens' secrets).
console_sessions = Table(
    "console_sessions",
    metadata,
    Column("id_sha256", String(64), primary_key=True),
    Column("token_id", String(32), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("last_seen_at", Timestamp, nullable=False),
    Index("ix_console_sessions_last_seen_at", "last_seen_at"),
)

# Background work (CRL regeneration, ACME validation, webhook retries): claimed by worker
# threads in any gateway process, so nothing depends on one process's memory.
jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    # At most one pending job per dedupe key (e.g. "crl:<ca id>"): re-enqueueing is free.
    Column("dedupe_key", String(200), nullable=True, unique=True),
    Column("status", String(16), nullable=False),
    Column("run_at", Timestamp, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("max_attempts", Integer, nullable=False, server_default="5"),
    Column("locked_by", String(128), nullable=True),
    Column("locked_until", Timestamp, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("finished_at", Timestamp, nullable=True),
    Index("ix_jobs_status_run_at", "status", "run_at"),
)

# Published CRLs, newest per (CA, partition) served. Partition 0 is the complete CRL.
crls = Table(
    "crls",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ca_id", String(64), ForeignKey("authorities.id"), nullable=False),
    Column("crl_partition", Integer, nullable=False),
    Column("crl_number", BigInteger, nullable=False),
    Column("this_update", Timestamp, nullable=False),
    Column("next_update", Timestamp, nullable=False),
    Column("entries", Integer, nullable=False),
    Column("der", LargeBinary, nullable=False),
    UniqueConstraint("ca_id", "crl_partition", "crl_number", name="uq_crls_number"),
)

# Where the next certificate of a PARTITIONED CA goes: partition `current` holds `fill`.
crl_partitions = Table(
    "crl_partitions",
    metadata,
    Column("ca_id", String(64), ForeignKey("authorities.id"), primary_key=True),
    Column("current", Integer, nullable=False),
    Column("fill", Integer, nullable=False),
)

# Delegated OCSP responders (OCSPSigningCertificate/V1), their keys sealed like CA keys.
ocsp_responders = Table(
    "ocsp_responders",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("ca_id", String(64), ForeignKey("authorities.id"), nullable=False, index=True),
    Column("key_id", String(64), ForeignKey("ca_keys.id"), nullable=False),
    Column("certificate_der", LargeBinary, nullable=False),
    Column("not_before", Timestamp, nullable=False),
    Column("not_after", Timestamp, nullable=False),
    Column("created_at", Timestamp, nullable=False),
)

# Signed responses without a nonce, reused until shortly before nextUpdate; a revocation
# deletes its row in the same transaction.
ocsp_responses = Table(
    "ocsp_responses",
    metadata,
    Column("ca_id", String(64), primary_key=True),
    Column("serial", String(64), primary_key=True),
    Column("der", LargeBinary, nullable=False),
    Column("this_update", Timestamp, nullable=False),
    Column("next_update", Timestamp, nullable=False),
)

# SCEP registration-authority certificates (RSA: SCEP envelopes need an RSA recipient even
# when the CA key is EC), one series per connector instance, keys sealed like CA keys.
scep_ra_certificates = Table(
    "scep_ra_certificates",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("connector", String(128), nullable=False, index=True),
    Column("ca_id", String(64), ForeignKey("authorities.id"), nullable=False),
    Column("key_id", String(64), ForeignKey("ca_keys.id"), nullable=False),
    Column("certificate_der", LargeBinary, nullable=False),
    Column("not_before", Timestamp, nullable=False),
    Column("not_after", Timestamp, nullable=False),
    Column("created_at", Timestamp, nullable=False),
)

# One-time SCEP challenges handed to an MDM through the management API. Only a SHA-256 of
# the secret is kept (the secrets are 128 random bits).
scep_challenges = Table(
    "scep_challenges",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("connector", String(128), nullable=False),
    Column("secret_sha256", String(64), nullable=False, unique=True),
    Column("subject", Text, nullable=True),
    Column("device_id", String(256), nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("created_by", String(256), nullable=False),
    Column("expires_at", Timestamp, nullable=False),
    Column("used_at", Timestamp, nullable=True),
    # JSON list of the alternative names ("DNS:host", ...) a bound challenge enrolls.
    Column("sans", Text, nullable=True),
)

# What each SCEP transactionID asked for and what became of it: a retried transaction
# gets its certificate again, a reused one with another request is refused. The request
# and its authorization evidence are kept so that a PENDING one can be approved later.
scep_transactions = Table(
    "scep_transactions",
    metadata,
    Column("connector", String(128), primary_key=True),
    Column("transaction_id", String(256), primary_key=True),
    Column("csr_sha256", String(64), nullable=False),
    Column("csr_der", LargeBinary, nullable=False),
    Column("evidence", Text, nullable=False, server_default="{}"),
    Column("subject", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("ca_id", String(64), nullable=True),
    Column("serial", String(64), nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

# Failed challenge attempts per connector and client address or transactionID, counted in
# a fixed window, shared by every gateway process.
scep_failures = Table(
    "scep_failures",
    metadata,
    Column("connector", String(128), primary_key=True),
    Column("scope", String(16), primary_key=True),
    Column("value", String(256), primary_key=True),
    Column("count", Integer, nullable=False),
    Column("window_start", Timestamp, nullable=False),
)

# -- ACME (RFC 8555) -----------------------------------------------------------------------
# Rows are scoped by connector instance name: two ACME connectors share nothing.

# Nonces (see pkigate.acme.nonces): the durable counter of nonce generations, bumped once
# per start; and, on PostgreSQL, the nonce book: the live generation and the spent nonces,
# in UNLOGGED tables (created so by migration 0012; plain tables on SQLite, where the book
# is a file of its own and these two stay empty).
acme_nonce_generations = Table(
    "acme_nonce_generations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("generation", BigInteger, nullable=False),
)

acme_nonce_epoch = Table(
    "acme_nonce_epoch",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("generation", BigInteger, nullable=False),
)

acme_spent_nonces = Table(
    "acme_spent_nonces",
    metadata,
    Column("nonce", String(64), primary_key=True),
    Column("generation", BigInteger, nullable=False),
    Column("expires_at", Timestamp, nullable=False, index=True),
)

acme_accounts = Table(
    "acme_accounts",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("connector", String(128), nullable=False),
    # RFC 7638 thumbprint: one account per key and connector.
    Column("thumbprint", String(64), nullable=False),
    Column("jwk", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("contact", Text, nullable=False, server_default="[]"),
    Column("eab_key_id", String(64), nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    UniqueConstraint("connector", "thumbprint", name="uq_acme_accounts_connector_thumbprint"),
)

# External account binding keys, created by administrators. The HMAC key is sealed with a
# key derived from the KEK (it must be usable, so it cannot be only hashed).
acme_eab_keys = Table(
    "acme_eab_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("connector", String(128), nullable=False),
    Column("sealed_key", LargeBinary, nullable=False),
    Column("label", String(256), nullable=True),
    # JSON: {"dns_suffixes": [...], "ip_networks": [...]} or null for the connector's own.
    Column("allowed_identifiers", Text, nullable=True),
    Column("default_profile", String(64), nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("created_by", String(256), nullable=False),
    Column("account_id", String(32), nullable=True, unique=True),
    Column("bound_at", Timestamp, nullable=True),
    Column("revoked_at", Timestamp, nullable=True),
)

acme_orders = Table(
    "acme_orders",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("connector", String(128), nullable=False),
    Column("account_id", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("expires_at", Timestamp, nullable=False),
    # JSON list of {"type", "value"} in the order the client sent them.
    Column("identifiers", Text, nullable=False),
    Column("profile", String(64), nullable=True),
    # ARI (RFC 9773): the certificate this order replaces, as its certID.
    Column("replaces", String(256), nullable=True),
    Column("error", Text, nullable=True),
    Column("ca_id", String(64), nullable=True),
    Column("serial", String(64), nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Index("ix_acme_orders_account", "account_id", "created_at"),
    Index("ix_acme_orders_certificate", "ca_id", "serial"),
    Index("ix_acme_orders_replaces", "connector", "replaces"),
)

acme_authorizations = Table(
    "acme_authorizations",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("connector", String(128), nullable=False),
    Column("account_id", String(32), nullable=False),
    Column("identifier_type", String(8), nullable=False),
    Column("identifier_value", String(256), nullable=False),
    Column("wildcard", Integer, nullable=False, server_default="0"),
    Column("status", String(16), nullable=False),
    Column("expires_at", Timestamp, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    # Valid authorizations are looked up for reuse by account and identifier.
    Index(
        "ix_acme_authorizations_reuse",
        "account_id",
        "identifier_type",
        "identifier_value",
        "status",
    ),
)

acme_order_authorizations = Table(
    "acme_order_authorizations",
    metadata,
    Column("order_id", String(32), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("authorization_id", String(32), nullable=False, index=True),
)

acme_challenges = Table(
    "acme_challenges",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("authorization_id", String(32), nullable=False, index=True),
    Column("type", String(16), nullable=False),
    Column("token", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("validated_at", Timestamp, nullable=True),
    Column("error", Text, nullable=True),
    Column("validation_record", Text, nullable=True),
    Column("updated_at", Timestamp, nullable=False),
)

# Rate-limit counters in fixed windows (new orders per account, failed validations per
# identifier), shared by every gateway process.
acme_rate_counters = Table(
    "acme_rate_counters",
    metadata,
    Column("connector", String(128), primary_key=True),
    Column("scope", String(16), primary_key=True),
    Column("value", String(256), primary_key=True),
    Column("count", Integer, nullable=False),
    Column("window_start", Timestamp, nullable=False),
)

# -- AD-style enrollment ---------------------------------------------------------------------

# Every enrollment request the AD-style connector accepted for processing: its id is the
# RequestID that MS-WSTEP answers with and QueryTokenStatus asks about. Requests held by a
# pend-all template wait here for an administrator; approval decides again from the
# directory as it is then.
adcs_requests = Table(
    "adcs_requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("connector", String(128), nullable=False),
    Column("template", String(256), nullable=False),
    Column("principal_sid", String(128), nullable=False),
    Column("principal_name", String(256), nullable=False),
    Column("csr_der", LargeBinary, nullable=False),
    Column("attributes", Text, nullable=False, server_default="[]"),
    Column("status", String(16), nullable=False),
    Column("ca_id", String(64), nullable=True),
    Column("serial", String(64), nullable=True),
    Column("reason", Text, nullable=True),
    Column("decided_by", String(256), nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    # Whether the issued certificate names its principal from the directory only, so that
    # it may log in as that principal (not when the request supplied the subject); NULL
    # for requests settled before revision 0007 (decided from the template then).
    Column("names_from_directory", Boolean, nullable=True),
    Index("ix_adcs_requests_status", "connector", "status"),
    Index("ix_adcs_requests_certificate", "ca_id", "serial"),
)

# The outbox of events (core/events.py): each row written in the transaction of the change
# it reports, so a rollback leaves none. ``once_key`` makes an event that a periodic job
# finds (a certificate 30 days from expiry) unique however many workers and hosts look.
events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("type", String(64), nullable=False),
    Column("occurred_at", Timestamp, nullable=False),
    Column("ca_id", String(64), nullable=True),
    Column("serial", String(64), nullable=True),
    Column("template", String(128), nullable=True),
    Column("once_key", String(200), nullable=True, unique=True),
    # JSON: the event's data (subject, not_after, requester, ...).
    Column("data", Text, nullable=False),
    Index("ix_events_type_id", "type", "id"),
)

# One row per event and destination that wants it; the delivery job updates it.
event_deliveries = Table(
    "event_deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(36), ForeignKey("events.event_id"), nullable=False),
    Column("destination", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # pending | delivered | dead | cancelled
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("updated_at", Timestamp, nullable=False),
    UniqueConstraint("event_id", "destination", name="uq_event_deliveries_event_destination"),
    Index("ix_event_deliveries_status", "status"),
)

# How far each destination's dispatcher has looked (events.id), so none is looked at twice.
event_cursors = Table(
    "event_cursors",
    metadata,
    Column("destination", String(64), primary_key=True),
    Column("last_id", Integer, nullable=False),
)

# Notification destinations created through the API (gateways/destinations.py); the TOML's
# are not stored. ``version`` grows with each change: workers compare it to reload.
notification_destinations = Table(
    "notification_destinations",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("type", String(16), nullable=False),  # webhook | email
    Column("settings", Text, nullable=False),  # JSON: url, smtp_host, timeout_seconds, ...
    Column("filters", Text, nullable=False),  # JSON: events, cas, templates
    # AES-256-GCM under the KEK (core/keys.Sealer), the name as associated data: JSON of
    # the webhook's HMAC secret or the SMTP password. Never returned by a read.
    Column("sealed_secret", LargeBinary, nullable=True),
    Column("version", Integer, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("created_by", String(256), nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Column("updated_by", String(256), nullable=False),
)
