"""Windows security data ([MS-DTYP]) and certificate template permissions ([MS-CRTD] 2.5).

Everything here works on bytes as AD stores them: SIDs (2.4.2.2), GUIDs (2.3.4.2),
self-relative security descriptors (2.4.6), ACLs (2.4.5) and ACEs (2.4.4). Parsing is
bounded by the buffer: truncated data, offsets or sizes pointing outside it, and absurd
counts raise :class:`MalformedSecurityDescriptor` (or :class:`InvalidSid` for a SID on its
own), never ``IndexError`` or ``struct.error``.

:func:`enroll_rights` answers "may these SIDs Enroll / AutoEnroll on this template?".
"""

from __future__ import annotations

import string
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag

# Extended rights on pKICertificateTemplate objects ([MS-CRTD] 2.5.1, 2.5.2).
ENROLL_RIGHT = uuid.UUID("0e10c968-78fb-11d2-90d4-00c04f79dc55")
AUTOENROLL_RIGHT = uuid.UUID("a05b8cc2-17bc-4802-a710-e7c15ab866a2")

# Well-known SIDs ([MS-DTYP] 2.4.2.4) in every authenticated principal's token. AD does not
# store them in any group's `member`, so whoever builds a requester's SID set adds them.
EVERYONE = "S-1-1-0"
AUTHENTICATED_USERS = "S-1-5-11"

# AD caps nTSecurityDescriptor at 132096 bytes ([MS-ADA3] 2.37, rangeUpper).
MAX_SECURITY_DESCRIPTOR_BYTES = 132096
MAX_SUB_AUTHORITIES = 15  # [MS-DTYP] 2.4.2: SubAuthorityCount is at most 15

SD_REVISION = 1
SD_HEADER = struct.Struct("<BBHIIII")  # Revision, Sbz1, Control, Owner, Group, Sacl, Dacl
ACL_HEADER = struct.Struct("<BBHHH")  # AclRevision, Sbz1, AclSize, AceCount, Sbz2
ACE_HEADER = struct.Struct("<BBH")  # AceType, AceFlags, AceSize
ACL_REVISION = 2
ACL_REVISION_DS = 4  # needed as soon as the ACL holds an object ACE
GUID_BYTES = 16


class SecurityDataError(ValueError):
    """Windows security data that cannot be decoded."""


class InvalidSid(SecurityDataError):
    """A SID, binary or string, that is not well formed."""


class MalformedSecurityDescriptor(SecurityDataError):
    """A security descriptor, ACL or ACE that is truncated, inconsistent or out of bounds."""


class SdControl(IntFlag):
    """SECURITY_DESCRIPTOR Control bits ([MS-DTYP] 2.4.6)."""

    SE_OWNER_DEFAULTED = 0x0001
    SE_GROUP_DEFAULTED = 0x0002
    SE_DACL_PRESENT = 0x0004
    SE_DACL_DEFAULTED = 0x0008
    SE_SACL_PRESENT = 0x0010
    SE_SACL_DEFAULTED = 0x0020
    SE_DACL_TRUSTED = 0x0040
    SE_SERVER_SECURITY = 0x0080
    SE_DACL_COMPUTED_INHERITANCE_REQUIRED = 0x0100
    SE_SACL_COMPUTED_INHERITANCE_REQUIRED = 0x0200
    SE_DACL_AUTO_INHERITED = 0x0400
    SE_SACL_AUTO_INHERITED = 0x0800
    SE_DACL_PROTECTED = 0x1000
    SE_SACL_PROTECTED = 0x2000
    SE_RM_CONTROL_VALID = 0x4000
    SE_SELF_RELATIVE = 0x8000


class AceType(IntEnum):
    """The ACE types this module decodes ([MS-DTYP] 2.4.4.1); others are skipped."""

    ACCESS_ALLOWED = 0x00
    ACCESS_DENIED = 0x01
    ACCESS_ALLOWED_OBJECT = 0x05
    ACCESS_DENIED_OBJECT = 0x06


class AceFlag(IntFlag):
    """ACE_HEADER AceFlags ([MS-DTYP] 2.4.4.1)."""

    OBJECT_INHERIT_ACE = 0x01
    CONTAINER_INHERIT_ACE = 0x02
    NO_PROPAGATE_INHERIT_ACE = 0x04
    INHERIT_ONLY_ACE = 0x08
    INHERITED_ACE = 0x10
    SUCCESSFUL_ACCESS_ACE_FLAG = 0x40
    FAILED_ACCESS_ACE_FLAG = 0x80


NO_ACE_FLAGS = AceFlag(0)


class ObjectAceFlag(IntFlag):
    """Flags of an object ACE: which GUIDs follow ([MS-DTYP] 2.4.4.3)."""

    ACE_OBJECT_TYPE_PRESENT = 0x1
    ACE_INHERITED_OBJECT_TYPE_PRESENT = 0x2


class AccessMask(IntFlag):
    """Directory-service access rights ([MS-DTYP] 2.4.3, [MS-ADTS] 5.1.3.2)."""

    ADS_RIGHT_DS_CREATE_CHILD = 0x00000001
    ADS_RIGHT_DS_DELETE_CHILD = 0x00000002
    ADS_RIGHT_ACTRL_DS_LIST = 0x00000004
    ADS_RIGHT_DS_SELF = 0x00000008
    ADS_RIGHT_DS_READ_PROP = 0x00000010
    ADS_RIGHT_DS_WRITE_PROP = 0x00000020
    ADS_RIGHT_DS_DELETE_TREE = 0x00000040
    ADS_RIGHT_DS_LIST_OBJECT = 0x00000080
    ADS_RIGHT_DS_CONTROL_ACCESS = 0x00000100
    DELETE = 0x00010000
    READ_CONTROL = 0x00020000
    WRITE_DAC = 0x00040000
    WRITE_OWNER = 0x00080000
    SYNCHRONIZE = 0x00100000
    ACCESS_SYSTEM_SECURITY = 0x01000000
    MAXIMUM_ALLOWED = 0x02000000
    GENERIC_ALL = 0x10000000
    GENERIC_EXECUTE = 0x20000000
    GENERIC_WRITE = 0x40000000
    GENERIC_READ = 0x80000000


# "Full Control" as AD's ACL editor writes it: every standard and DS-specific right.
FULL_CONTROL = AccessMask(0x000F01FF)
# "Read" on an AD object: read properties, list, list object, read permissions.
GENERIC_READ_DS = (
    AccessMask.ADS_RIGHT_DS_READ_PROP
    | AccessMask.ADS_RIGHT_ACTRL_DS_LIST
    | AccessMask.ADS_RIGHT_DS_LIST_OBJECT
    | AccessMask.READ_CONTROL
)
_DECODED_ACE_TYPES = frozenset(int(ace_type) for ace_type in AceType)
# Either bit carries an extended right (GENERIC_ALL is what an unmapped "full control" says).
_EXTENDED_RIGHT_BITS = AccessMask.ADS_RIGHT_DS_CONTROL_ACCESS | AccessMask.GENERIC_ALL


# --- SIDs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sid:
    """A security identifier ([MS-DTYP] 2.4.2)."""

    authority: int
    """IdentifierAuthority, 48 bits (5 for NT AUTHORITY)."""
    sub_authorities: tuple[int, ...]
    """SubAuthority values, 32 bits each, at most 15; the last is the RID for accounts."""

    def __post_init__(self) -> None:
        if not 0 <= self.authority < 1 << 48:
            raise InvalidSid(f"identifier authority {self.authority} is not a 48-bit value")
        if len(self.sub_authorities) > MAX_SUB_AUTHORITIES:
            raise InvalidSid(
                f"{len(self.sub_authorities)} sub-authorities; at most {MAX_SUB_AUTHORITIES}"
            )
        if any(not 0 <= value < 1 << 32 for value in self.sub_authorities):
            raise InvalidSid("a sub-authority is not a 32-bit value")

    @classmethod
    def parse(cls, text: str) -> Sid:
        """Parse the string form "S-1-5-21-…" ([MS-DTYP] 2.4.2.1); the "S" may be lowercase."""
        parts = text.strip().split("-")
        if len(parts) < 3 or parts[0] not in ("S", "s") or parts[1] != "1":
            raise InvalidSid(f"not a revision 1 SID string: {text!r}")
        authority_text, *sub_texts = parts[2:]
        try:
            # An authority of 2**32 or more is written in hexadecimal ([MS-DTYP] 2.4.2.1).
            if authority_text[:2].lower() == "0x":
                authority = _hexadecimal(authority_text[2:])
            else:
                authority = _decimal(authority_text)
            subs = tuple(_decimal(part) for part in sub_texts)
        except ValueError:
            raise InvalidSid(f"not a SID string: {text!r}") from None
        return cls(authority, subs)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Sid:
        """Decode a binary SID that occupies all of ``data``."""
        sid, end = _read_sid(bytes(data), 0, len(data), error=InvalidSid)
        if end != len(data):
            raise InvalidSid(f"{len(data) - end} bytes after the SID")
        return sid

    def to_bytes(self) -> bytes:
        """The binary form ([MS-DTYP] 2.4.2.2): counts little-endian, authority big-endian."""
        return (
            bytes((SD_REVISION, len(self.sub_authorities)))
            + self.authority.to_bytes(6, "big")
            + b"".join(value.to_bytes(4, "little") for value in self.sub_authorities)
        )

    @property
    def rid(self) -> int:
        """The relative identifier: the last sub-authority."""
        if not self.sub_authorities:
            raise InvalidSid(f"{self} has no relative identifier")
        return self.sub_authorities[-1]

    def with_rid(self, rid: int) -> Sid:
        """The SID of the account ``rid`` in the domain this SID identifies."""
        return Sid(self.authority, (*self.sub_authorities, rid))

    def __str__(self) -> str:
        authority = str(self.authority) if self.authority < 1 << 32 else f"0x{self.authority:012X}"
        return "-".join(("S-1", authority, *(str(value) for value in self.sub_authorities)))


def _decimal(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(text)
    return int(text)


def _hexadecimal(text: str) -> int:
    if not text or any(char not in string.hexdigits for char in text):
        raise ValueError(text)
    return int(text, 16)


def sid_to_string(data: bytes) -> str:
    """Binary SID to "S-1-…"."""
    return str(Sid.from_bytes(data))


def sid_to_bytes(text: str) -> bytes:
    """ "S-1-…" to binary SID."""
    return Sid.parse(text).to_bytes()


def canonical_sid(text: str) -> str:
    """The canonical string form of a SID string (validated)."""
    return str(Sid.parse(text))


def _read_sid(
    data: bytes, offset: int, limit: int, *, error: type[SecurityDataError]
) -> tuple[Sid, int]:
    """Decode the SID at ``offset`` that must end by ``limit``; return it and its end."""
    if offset < 0 or offset + 8 > limit:
        raise error(f"SID at offset {offset} runs past the end ({limit})")
    revision, count = data[offset], data[offset + 1]
    if revision != SD_REVISION:
        raise error(f"SID at offset {offset} has revision {revision}, not 1")
    if count > MAX_SUB_AUTHORITIES:
        raise error(f"SID at offset {offset} claims {count} sub-authorities")
    end = offset + 8 + 4 * count
    if end > limit:
        raise error(f"SID at offset {offset} runs past the end ({limit})")
    authority = int.from_bytes(data[offset + 2 : offset + 8], "big")
    subs = tuple(
        int.from_bytes(data[start : start + 4], "little") for start in range(offset + 8, end, 4)
    )
    return Sid(authority, subs), end


# --- GUIDs ----------------------------------------------------------------------------------


def guid_from_bytes(data: bytes) -> uuid.UUID:
    """A GUID from its 16-byte wire form ([MS-DTYP] 2.3.4.2: first three fields little-endian)."""
    if len(data) != GUID_BYTES:
        raise SecurityDataError(f"a GUID is 16 bytes, not {len(data)}")
    return uuid.UUID(bytes_le=bytes(data))


def guid_to_bytes(guid: uuid.UUID | str) -> bytes:
    """The 16-byte wire form of a GUID, as objectGUID and object ACEs hold it."""
    if isinstance(guid, str):
        try:
            guid = uuid.UUID(guid)
        except ValueError:
            raise SecurityDataError(f"not a GUID: {guid!r}") from None
    return guid.bytes_le


# --- ACEs, ACLs, security descriptors ------------------------------------------------------


@dataclass(frozen=True)
class Ace:
    """One access control entry of a type this module understands."""

    type: AceType
    sid: str
    """The trustee, canonical "S-1-…" string."""
    mask: int
    """ACCESS_MASK (see :class:`AccessMask`)."""
    flags: AceFlag = NO_ACE_FLAGS
    """Inheritance and audit flags of the ACE header."""
    object_type: uuid.UUID | None = None
    """Object ACEs: the extended right, property or class the ACE is about (None: any)."""
    inherited_object_type: uuid.UUID | None = None
    """Object ACEs: the class of child objects that inherit the ACE (None: any)."""

    def __post_init__(self) -> None:
        object_ace = self.type in (AceType.ACCESS_ALLOWED_OBJECT, AceType.ACCESS_DENIED_OBJECT)
        if not object_ace and (self.object_type or self.inherited_object_type):
            raise ValueError(f"{self.type.name} ACEs carry no object type")
        if not 0 <= self.mask < 1 << 32:
            raise ValueError(f"access mask {self.mask:#x} is not a 32-bit value")
        object.__setattr__(self, "sid", canonical_sid(self.sid))

    @property
    def is_object_ace(self) -> bool:
        return self.type in (AceType.ACCESS_ALLOWED_OBJECT, AceType.ACCESS_DENIED_OBJECT)

    @property
    def is_deny(self) -> bool:
        return self.type in (AceType.ACCESS_DENIED, AceType.ACCESS_DENIED_OBJECT)

    def to_bytes(self) -> bytes:
        body = struct.pack("<I", self.mask)
        if self.is_object_ace:
            object_flags = ObjectAceFlag(0)
            guids = b""
            if self.object_type is not None:
                object_flags |= ObjectAceFlag.ACE_OBJECT_TYPE_PRESENT
                guids += self.object_type.bytes_le
            if self.inherited_object_type is not None:
                object_flags |= ObjectAceFlag.ACE_INHERITED_OBJECT_TYPE_PRESENT
                guids += self.inherited_object_type.bytes_le
            body += struct.pack("<I", object_flags) + guids
        body += sid_to_bytes(self.sid)
        return ACE_HEADER.pack(self.type, self.flags, ACE_HEADER.size + len(body)) + body


def allow(sid: str, right: uuid.UUID | None = None, mask: int | None = None) -> Ace:
    """An allow ACE: an object ACE for ``right`` (mask CONTROL_ACCESS unless given), or
    without ``right`` a plain ACE (mask Full Control unless given)."""
    if right is None:
        return Ace(AceType.ACCESS_ALLOWED, sid, FULL_CONTROL if mask is None else mask)
    return Ace(
        AceType.ACCESS_ALLOWED_OBJECT,
        sid,
        AccessMask.ADS_RIGHT_DS_CONTROL_ACCESS if mask is None else mask,
        object_type=right,
    )


def deny(sid: str, right: uuid.UUID | None = None, mask: int | None = None) -> Ace:
    """A deny ACE, built as :func:`allow` builds an allow ACE."""
    if right is None:
        return Ace(AceType.ACCESS_DENIED, sid, FULL_CONTROL if mask is None else mask)
    return Ace(
        AceType.ACCESS_DENIED_OBJECT,
        sid,
        AccessMask.ADS_RIGHT_DS_CONTROL_ACCESS if mask is None else mask,
        object_type=right,
    )


@dataclass(frozen=True)
class SecurityDescriptor:
    """A decoded self-relative security descriptor."""

    control: SdControl
    owner: str | None
    group: str | None
    dacl: tuple[Ace, ...] | None
    """The DACL's ACEs of the types in :class:`AceType`, in order; None when absent or NULL."""
    skipped_aces: int = 0
    """DACL ACEs of other types (callback, mandatory label, …), which are not decoded."""


def build_security_descriptor(
    owner_sid: str, aces: Sequence[Ace], *, group_sid: str | None = None
) -> bytes:
    """A self-relative security descriptor with a DACL holding ``aces`` in the given order."""
    owner = sid_to_bytes(owner_sid)
    group = sid_to_bytes(group_sid) if group_sid is not None else b""
    encoded = b"".join(ace.to_bytes() for ace in aces)
    revision = ACL_REVISION_DS if any(ace.is_object_ace for ace in aces) else ACL_REVISION
    acl_size = ACL_HEADER.size + len(encoded)
    if acl_size > 0xFFFF or len(aces) > 0xFFFF:
        raise ValueError("the ACEs do not fit in one ACL")
    dacl = ACL_HEADER.pack(revision, 0, acl_size, len(aces), 0) + encoded
    owner_offset = SD_HEADER.size
    group_offset = owner_offset + len(owner) if group else 0
    dacl_offset = owner_offset + len(owner) + len(group)
    control = SdControl.SE_SELF_RELATIVE | SdControl.SE_DACL_PRESENT
    header = SD_HEADER.pack(SD_REVISION, 0, control, owner_offset, group_offset, 0, dacl_offset)
    return header + owner + group + dacl


def parse_security_descriptor(data: bytes | bytearray | memoryview) -> SecurityDescriptor:
    """Decode a self-relative security descriptor ([MS-DTYP] 2.4.6).

    Raises :class:`MalformedSecurityDescriptor` for anything truncated, out of bounds or not
    self-relative. The SACL, when present, is bounds-checked but not returned.
    """
    data = bytes(data)
    if len(data) > MAX_SECURITY_DESCRIPTOR_BYTES:
        raise MalformedSecurityDescriptor(
            f"security descriptor is {len(data)} bytes; at most "
            f"{MAX_SECURITY_DESCRIPTOR_BYTES} accepted"
        )
    if len(data) < SD_HEADER.size:
        raise MalformedSecurityDescriptor(
            f"security descriptor is {len(data)} bytes, shorter than its header"
        )
    revision, _sbz1, control_bits, owner_at, group_at, sacl_at, dacl_at = SD_HEADER.unpack_from(
        data
    )
    control = SdControl(control_bits)
    if revision != SD_REVISION:
        raise MalformedSecurityDescriptor(f"security descriptor revision {revision}, not 1")
    if not control & SdControl.SE_SELF_RELATIVE:
        # Offsets are only meaningful in the self-relative form; AD stores nothing else.
        raise MalformedSecurityDescriptor("security descriptor is not self-relative")
    owner = _optional_sid(data, owner_at, "owner")
    group = _optional_sid(data, group_at, "group")
    if control & SdControl.SE_SACL_PRESENT and sacl_at:
        _read_acl(data, sacl_at, "SACL")
    dacl: tuple[Ace, ...] | None = None
    skipped = 0
    if control & SdControl.SE_DACL_PRESENT and dacl_at:
        dacl, skipped = _read_acl(data, dacl_at, "DACL")
    return SecurityDescriptor(control, owner, group, dacl, skipped)


def _check_offset(data: bytes, offset: int, what: str) -> None:
    if offset < SD_HEADER.size or offset >= len(data):
        raise MalformedSecurityDescriptor(
            f"{what} offset {offset} is not between the header and the end ({len(data)} bytes)"
        )


def _optional_sid(data: bytes, offset: int, what: str) -> str | None:
    if offset == 0:
        return None
    _check_offset(data, offset, what)
    sid, _end = _read_sid(data, offset, len(data), error=MalformedSecurityDescriptor)
    return str(sid)


def _read_acl(data: bytes, offset: int, what: str) -> tuple[tuple[Ace, ...], int]:
    """Decode the ACL at ``offset``: the decodable ACEs and the number of others skipped."""
    _check_offset(data, offset, what)
    if offset + ACL_HEADER.size > len(data):
        raise MalformedSecurityDescriptor(f"{what} header runs past the end")
    revision, _sbz1, acl_size, ace_count, _sbz2 = ACL_HEADER.unpack_from(data, offset)
    if revision not in (ACL_REVISION, ACL_REVISION_DS):
        raise MalformedSecurityDescriptor(f"{what} revision {revision}, not 2 or 4")
    if acl_size < ACL_HEADER.size or offset + acl_size > len(data):
        raise MalformedSecurityDescriptor(
            f"{what} size {acl_size} at offset {offset} does not fit in {len(data)} bytes"
        )
    # Every ACE takes at least its 4-byte header: a count that cannot fit is absurd.
    if ace_count * ACE_HEADER.size > acl_size - ACL_HEADER.size:
        raise MalformedSecurityDescriptor(f"{what} claims {ace_count} ACEs in {acl_size} bytes")
    end = offset + acl_size
    position = offset + ACL_HEADER.size
    aces: list[Ace] = []
    skipped = 0
    for index in range(ace_count):
        if position + ACE_HEADER.size > end:
            raise MalformedSecurityDescriptor(f"{what} ACE {index} runs past the ACL")
        ace_type, ace_flags, ace_size = ACE_HEADER.unpack_from(data, position)
        if ace_size < ACE_HEADER.size or ace_size % 4 or position + ace_size > end:
            raise MalformedSecurityDescriptor(
                f"{what} ACE {index} has size {ace_size}, which does not fit the ACL"
            )
        if ace_type in _DECODED_ACE_TYPES:
            aces.append(
                _read_ace(data, position, position + ace_size, AceType(ace_type), ace_flags)
            )
        else:
            skipped += 1
        position += ace_size
    return tuple(aces), skipped


def _read_ace(data: bytes, start: int, end: int, ace_type: AceType, flags: int) -> Ace:
    position = start + ACE_HEADER.size
    if position + 4 > end:
        raise MalformedSecurityDescriptor(f"ACE at offset {start} has no access mask")
    (mask,) = struct.unpack_from("<I", data, position)
    position += 4
    object_type = inherited_object_type = None
    if ace_type in (AceType.ACCESS_ALLOWED_OBJECT, AceType.ACCESS_DENIED_OBJECT):
        if position + 4 > end:
            raise MalformedSecurityDescriptor(f"object ACE at offset {start} has no flags")
        (object_flags,) = struct.unpack_from("<I", data, position)
        position += 4
        if object_flags & ObjectAceFlag.ACE_OBJECT_TYPE_PRESENT:
            object_type, position = _read_guid(data, position, end, start)
        if object_flags & ObjectAceFlag.ACE_INHERITED_OBJECT_TYPE_PRESENT:
            inherited_object_type, position = _read_guid(data, position, end, start)
    sid, _sid_end = _read_sid(data, position, end, error=MalformedSecurityDescriptor)
    return Ace(ace_type, str(sid), mask, AceFlag(flags), object_type, inherited_object_type)


def _read_guid(data: bytes, position: int, end: int, ace_start: int) -> tuple[uuid.UUID, int]:
    if position + GUID_BYTES > end:
        raise MalformedSecurityDescriptor(f"object ACE at offset {ace_start} is cut in a GUID")
    return uuid.UUID(bytes_le=data[position : position + GUID_BYTES]), position + GUID_BYTES


# --- certificate template permissions ------------------------------------------------------


@dataclass(frozen=True)
class Rights:
    """A requester's permissions on one certificate template."""

    enroll: bool
    """The Enroll extended right ([MS-CRTD] 2.5.1)."""
    autoenroll: bool
    """The AutoEnroll extended right ([MS-CRTD] 2.5.2), on its own."""

    @property
    def can_autoenroll(self) -> bool:
        """Autoenrollment needs both rights: AutoEnroll alone enrolls nothing."""
        return self.enroll and self.autoenroll


def enroll_rights(sd_bytes: bytes, sids: Iterable[str]) -> Rights:
    """The Enroll and AutoEnroll rights that the DACL in ``sd_bytes`` gives ``sids``.

    ``sids`` is the requester's whole token: its own SID, the SIDs of every group it belongs
    to, directly or through nesting (including its primary group), and the well-known
    :data:`EVERYONE` and :data:`AUTHENTICATED_USERS`.

    An ACE counts for a right when its trustee is in ``sids``, it is not INHERIT_ONLY, and
    either it is an object ACE whose ObjectType is the right's GUID (or that names no object
    type), or it is a plain ACE; its mask must hold ADS_RIGHT_DS_CONTROL_ACCESS or
    GENERIC_ALL (Full Control, 0xF01FF, includes CONTROL_ACCESS). [MS-CRTD] 2.5.1 and 2.5.2
    define the allow side.

    Deny wins, whatever the ACE order: one matching deny ACE takes the right away even when an
    allow ACE comes first. Windows' access check stops at the first ACE that decides, but
    ACLs written by its tools are in canonical order with explicit denies first, so for them
    the outcome is the same; for a hand-made ACL in another order this is the stricter
    reading, which is what pkigate wants.

    A DACL that is absent or NULL grants nothing here (Windows would grant everything):
    enrollment is only ever granted by an ACE that names the right. ACE types other than
    allowed/denied and their object variants (callback, conditional, audit) are skipped.
    """
    descriptor = parse_security_descriptor(sd_bytes)
    token = {canonical_sid(sid) for sid in sids}
    return Rights(
        enroll=_has_right(descriptor.dacl, token, ENROLL_RIGHT),
        autoenroll=_has_right(descriptor.dacl, token, AUTOENROLL_RIGHT),
    )


def _has_right(dacl: tuple[Ace, ...] | None, token: set[str], right: uuid.UUID) -> bool:
    if dacl is None:
        return False
    allowed = False
    for ace in dacl:
        if not _ace_applies(ace, token, right):
            continue
        if ace.is_deny:
            return False
        allowed = True
    return allowed


def _ace_applies(ace: Ace, token: set[str], right: uuid.UUID) -> bool:
    if ace.flags & AceFlag.INHERIT_ONLY_ACE or ace.sid not in token:
        return False
    if not ace.mask & _EXTENDED_RIGHT_BITS:
        return False
    return ace.object_type is None or ace.object_type == right


def token_sids(principal_sid: str, group_sids: Iterable[str]) -> frozenset[str]:
    """An authenticated principal's token: its SID, its groups, Everyone, Authenticated Users."""
    return frozenset(
        {canonical_sid(principal_sid), EVERYONE, AUTHENTICATED_USERS}
        | {canonical_sid(sid) for sid in group_sids}
    )
