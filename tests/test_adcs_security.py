"""[MS-DTYP] SIDs, GUIDs and security descriptors, and Enroll/AutoEnroll rights ([MS-CRTD] 2.5)."""

from __future__ import annotations

import random
import struct
import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest

from pkigate.adcs.encoding import (
    MalformedAttributeValue,
    filetime_to_interval,
    from_ad_int32,
    interval_to_filetime,
    key_usage_from_bytes,
    key_usage_to_bytes,
    to_ad_int32,
)
from pkigate.adcs.flags import CertificateNameFlag, EnrollmentFlag, KeyUsage
from pkigate.adcs.security import (
    AUTHENTICATED_USERS,
    AUTOENROLL_RIGHT,
    ENROLL_RIGHT,
    EVERYONE,
    FULL_CONTROL,
    GENERIC_READ_DS,
    AccessMask,
    Ace,
    AceFlag,
    AceType,
    InvalidSid,
    MalformedSecurityDescriptor,
    SdControl,
    SecurityDataError,
    Sid,
    allow,
    build_security_descriptor,
    canonical_sid,
    deny,
    enroll_rights,
    guid_from_bytes,
    guid_to_bytes,
    parse_security_descriptor,
    sid_to_bytes,
    sid_to_string,
    token_sids,
)

DOMAIN = "S-1-5-21-1004336348-1177238915-682003330"
DOMAIN_ADMINS = f"{DOMAIN}-512"
DOMAIN_USERS = f"{DOMAIN}-513"
WEB_ADMINS = f"{DOMAIN}-1102"
PKI_USERS = f"{DOMAIN}-1101"
ALICE = f"{DOMAIN}-1104"
CAROL = f"{DOMAIN}-1106"
SD_OWNER_SID = 20  # the builder puts the owner SID right after the 20-byte header
OTHER_RIGHT = uuid.UUID("bf967aba-0de6-11d0-a285-00aa003049e2")  # not an enrollment right


def sd(*aces: Ace) -> bytes:
    return build_security_descriptor(DOMAIN_ADMINS, list(aces), group_sid=DOMAIN_ADMINS)


def rights(*aces: Ace, token: set[str] | frozenset[str] = frozenset({ALICE})) -> tuple[bool, bool]:
    result = enroll_rights(sd(*aces), set(token))
    return result.enroll, result.autoenroll


# --- SIDs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "binary"),
    [
        # BUILTIN\Administrators
        ("S-1-5-32-544", "01 02 00 00 00 00 00 05 20 00 00 00 20 02 00 00"),
        ("S-1-1-0", "01 01 00 00 00 00 00 01 00 00 00 00"),  # Everyone
        ("S-1-5-11", "01 01 00 00 00 00 00 05 0b 00 00 00"),  # Authenticated Users
        (
            f"{DOMAIN}-1104",
            "01 05 00 00 00 00 00 05 15 00 00 00 dc f4 dc 3b 83 3d 2b 46 82 8b a6 28 50 04 00 00",
        ),
    ],
)
def test_sid_string_and_binary_forms_round_trip(text: str, binary: str) -> None:
    raw = bytes.fromhex(binary)
    assert sid_to_bytes(text) == raw
    assert sid_to_string(raw) == text


def test_sid_with_a_48_bit_authority_is_written_in_hexadecimal() -> None:
    sid = Sid(0x123456789ABC, (7,))
    assert str(sid) == "S-1-0x123456789ABC-7"
    assert Sid.parse(str(sid)) == sid
    assert Sid.from_bytes(sid.to_bytes()) == sid


def test_sid_strings_are_canonicalised() -> None:
    assert canonical_sid("s-1-5-18") == "S-1-5-18"
    assert Sid.parse(DOMAIN).with_rid(513) == Sid.parse(DOMAIN_USERS)
    assert Sid.parse(DOMAIN_USERS).rid == 513


@pytest.mark.parametrize(
    "text",
    ["", "S-1-", "S-2-5-32", "X-1-5", "S-1-5-x", "S-1-5--1", "S-1-5-4294967296", "S-1-0x-1",
     "S-1-0xZZ-1", "S-1-281474976710656-1", "S-1-5-" + "-".join(["1"] * 16), "S-1-5-²"],
)  # fmt: skip
def test_malformed_sid_strings_are_rejected(text: str) -> None:
    with pytest.raises(InvalidSid):
        Sid.parse(text)


@pytest.mark.parametrize(
    "binary",
    [
        b"",
        bytes.fromhex("01 02 00 00 00 00 00 05 20 00 00 00"),  # one sub-authority short
        bytes.fromhex("02 01 00 00 00 00 00 05 12 00 00 00"),  # revision 2
        bytes.fromhex("01 10") + bytes(6 + 4 * 16),  # 16 sub-authorities
        bytes.fromhex("01 01 00 00 00 00 00 05 12 00 00 00 00"),  # a byte too many
    ],
)
def test_malformed_binary_sids_are_rejected(binary: bytes) -> None:
    with pytest.raises(InvalidSid):
        Sid.from_bytes(binary)


# --- GUIDs ------------------------------------------------------------------------------------


def test_enroll_and_autoenroll_guids_have_ads_mixed_endian_wire_form() -> None:
    assert guid_to_bytes(ENROLL_RIGHT) == bytes.fromhex("68c9100efb78d21190d400c04f79dc55")
    assert guid_to_bytes(AUTOENROLL_RIGHT) == bytes.fromhex("c28c5ba0bc170248a710e7c15ab866a2")
    assert guid_from_bytes(bytes.fromhex("68c9100efb78d21190d400c04f79dc55")) == ENROLL_RIGHT
    assert guid_to_bytes("0e10c968-78fb-11d2-90d4-00c04f79dc55") == guid_to_bytes(ENROLL_RIGHT)


@pytest.mark.parametrize("bad", [b"", bytes(15), bytes(17)])
def test_guid_of_the_wrong_length_is_rejected(bad: bytes) -> None:
    with pytest.raises(SecurityDataError):
        guid_from_bytes(bad)
    with pytest.raises(SecurityDataError):
        guid_to_bytes("not-a-guid")


# --- security descriptors ---------------------------------------------------------------------


def test_built_descriptor_parses_back_to_the_same_aces() -> None:
    aces = [
        deny(CAROL, ENROLL_RIGHT),
        allow(AUTHENTICATED_USERS, mask=GENERIC_READ_DS),
        allow(DOMAIN_USERS, ENROLL_RIGHT),
        Ace(
            AceType.ACCESS_ALLOWED_OBJECT,
            PKI_USERS,
            AccessMask.ADS_RIGHT_DS_CONTROL_ACCESS,
            AceFlag.CONTAINER_INHERIT_ACE,
            object_type=AUTOENROLL_RIGHT,
            inherited_object_type=OTHER_RIGHT,
        ),
    ]
    parsed = parse_security_descriptor(sd(*aces))
    assert parsed.owner == DOMAIN_ADMINS and parsed.group == DOMAIN_ADMINS
    assert parsed.control == SdControl.SE_SELF_RELATIVE | SdControl.SE_DACL_PRESENT
    assert parsed.dacl == tuple(aces)
    assert parsed.skipped_aces == 0


def test_acl_revision_is_ds_only_when_an_object_ace_is_present() -> None:
    def acl_revision(data: bytes) -> int:
        return data[_dacl_offset(data)]

    assert acl_revision(sd(allow(ALICE))) == 2
    assert acl_revision(sd(allow(ALICE), allow(ALICE, ENROLL_RIGHT))) == 4


# --- rights -----------------------------------------------------------------------------------


def test_enroll_object_ace_grants_enroll_only() -> None:
    assert rights(allow(ALICE, ENROLL_RIGHT)) == (True, False)


def test_autoenroll_alone_is_not_enough_to_autoenroll() -> None:
    result = enroll_rights(sd(allow(ALICE, AUTOENROLL_RIGHT)), {ALICE})
    assert (result.enroll, result.autoenroll, result.can_autoenroll) == (False, True, False)
    both = enroll_rights(sd(allow(ALICE, ENROLL_RIGHT), allow(ALICE, AUTOENROLL_RIGHT)), {ALICE})
    assert both.can_autoenroll


def test_right_granted_to_a_group_reaches_its_nested_members() -> None:
    grant = allow(PKI_USERS, ENROLL_RIGHT)
    # alice is in Web Admins, which is in PKI Users: her token holds all three SIDs.
    assert rights(grant, token={ALICE, WEB_ADMINS, PKI_USERS}) == (True, False)
    assert rights(grant, token={ALICE, WEB_ADMINS}) == (False, False)


def test_ace_for_someone_else_grants_nothing() -> None:
    assert rights(allow(CAROL, ENROLL_RIGHT), allow(CAROL, AUTOENROLL_RIGHT)) == (False, False)


@pytest.mark.parametrize("deny_first", [True, False])
def test_deny_wins_whatever_the_ace_order(deny_first: bool) -> None:
    aces = [allow(DOMAIN_USERS, ENROLL_RIGHT), deny(CAROL, ENROLL_RIGHT)]
    if deny_first:
        aces.reverse()
    token = {CAROL, DOMAIN_USERS}
    assert rights(*aces, token=token) == (False, False)
    assert rights(*aces, token={ALICE, DOMAIN_USERS}) == (True, False)


def test_deny_through_a_group_beats_allow_to_the_user_itself() -> None:
    aces = (allow(CAROL, ENROLL_RIGHT), deny(f"{DOMAIN}-1103", ENROLL_RIGHT))
    assert rights(*aces, token={CAROL, f"{DOMAIN}-1103"}) == (False, False)


def test_deny_of_autoenroll_leaves_enroll() -> None:
    aces = (
        allow(ALICE, ENROLL_RIGHT),
        allow(ALICE, AUTOENROLL_RIGHT),
        deny(ALICE, AUTOENROLL_RIGHT),
    )
    assert rights(*aces) == (True, False)


def test_plain_deny_with_control_access_denies_every_extended_right() -> None:
    aces = (allow(ALICE, ENROLL_RIGHT), deny(ALICE, mask=AccessMask.ADS_RIGHT_DS_CONTROL_ACCESS))
    assert rights(*aces) == (False, False)


def test_deny_of_unrelated_rights_does_not_deny_enroll() -> None:
    aces = (allow(ALICE, ENROLL_RIGHT), deny(ALICE, mask=AccessMask.ADS_RIGHT_DS_WRITE_PROP))
    assert rights(*aces) == (True, False)
    assert rights(allow(ALICE, ENROLL_RIGHT), deny(ALICE, OTHER_RIGHT)) == (True, False)


@pytest.mark.parametrize(
    "mask",
    [AccessMask.GENERIC_ALL, FULL_CONTROL, AccessMask.ADS_RIGHT_DS_CONTROL_ACCESS],
    ids=["generic-all", "full-control", "all-extended-rights"],
)
def test_plain_allow_with_control_access_or_generic_all_grants_both(mask: AccessMask) -> None:
    assert rights(allow(ALICE, mask=mask)) == (True, True)


def test_object_ace_without_object_type_applies_to_every_right() -> None:
    ace = Ace(AceType.ACCESS_ALLOWED_OBJECT, ALICE, AccessMask.ADS_RIGHT_DS_CONTROL_ACCESS)
    assert rights(ace) == (True, True)


def test_read_permission_or_another_extended_right_grants_nothing() -> None:
    assert rights(allow(ALICE, mask=GENERIC_READ_DS)) == (False, False)
    assert rights(allow(ALICE, OTHER_RIGHT)) == (False, False)
    assert rights(allow(ALICE, ENROLL_RIGHT, mask=AccessMask.ADS_RIGHT_DS_READ_PROP)) == (
        False,
        False,
    )


def test_inherit_only_aces_are_ignored() -> None:
    inherit_only = AceFlag.INHERIT_ONLY_ACE | AceFlag.CONTAINER_INHERIT_ACE
    grant = Ace(
        AceType.ACCESS_ALLOWED_OBJECT,
        ALICE,
        AccessMask.ADS_RIGHT_DS_CONTROL_ACCESS,
        inherit_only,
        object_type=ENROLL_RIGHT,
    )
    assert rights(grant) == (False, False)
    refuse = Ace(
        AceType.ACCESS_DENIED_OBJECT,
        ALICE,
        AccessMask.ADS_RIGHT_DS_CONTROL_ACCESS,
        inherit_only,
        object_type=ENROLL_RIGHT,
    )
    assert rights(allow(ALICE, ENROLL_RIGHT), refuse) == (True, False)


def test_inherited_aces_count() -> None:
    inherited = Ace(
        AceType.ACCESS_ALLOWED_OBJECT,
        ALICE,
        AccessMask.ADS_RIGHT_DS_CONTROL_ACCESS,
        AceFlag.INHERITED_ACE,
        object_type=ENROLL_RIGHT,
    )
    assert rights(inherited) == (True, False)


def test_everyone_and_authenticated_users_are_in_every_token() -> None:
    token = token_sids(ALICE, [WEB_ADMINS])
    assert token == {ALICE, WEB_ADMINS, EVERYONE, AUTHENTICATED_USERS}
    assert rights(allow(AUTHENTICATED_USERS, ENROLL_RIGHT), token=token) == (True, False)
    assert rights(allow(EVERYONE, AUTOENROLL_RIGHT), token=token) == (False, True)


def test_token_sids_are_compared_in_canonical_form() -> None:
    assert rights(allow(ALICE, ENROLL_RIGHT), token={ALICE.lower()}) == (True, False)
    with pytest.raises(InvalidSid):
        enroll_rights(sd(allow(ALICE, ENROLL_RIGHT)), {"alice"})


def _header(control: int, owner: int, group: int, sacl: int, dacl: int) -> bytes:
    return struct.pack("<BBHIIII", 1, 0, control, owner, group, sacl, dacl)


def test_absent_or_null_dacl_grants_nothing() -> None:
    self_relative = SdControl.SE_SELF_RELATIVE
    no_dacl = _header(self_relative, 0, 0, 0, 0)
    null_dacl = _header(self_relative | SdControl.SE_DACL_PRESENT, 0, 0, 0, 0)
    assert parse_security_descriptor(null_dacl).dacl is None
    for data in (no_dacl, null_dacl):
        assert enroll_rights(data, {ALICE, EVERYONE}) == enroll_rights(sd(), {ALICE})


def test_ace_types_it_does_not_decode_are_skipped_not_evaluated() -> None:
    good = sd(allow(ALICE, ENROLL_RIGHT))
    dacl_offset = struct.unpack_from("<I", good, 16)[0]
    revision, sbz1, size, count, sbz2 = struct.unpack_from("<BBHHH", good, dacl_offset)
    # A SYSTEM_MANDATORY_LABEL_ACE (0x11) and an ACCESS_DENIED_CALLBACK_ACE (0x0A).
    extra = struct.pack("<BBHI", 0x11, 0, 20, 1) + sid_to_bytes("S-1-16-4096")
    extra += struct.pack("<BBHI", 0x0A, 0, 20, 0x100) + sid_to_bytes("S-1-1-0")
    header = struct.pack("<BBHHH", revision, sbz1, size + len(extra), count + 2, sbz2)
    data = good[:dacl_offset] + header + good[dacl_offset + 8 :] + extra
    parsed = parse_security_descriptor(data)
    assert parsed.skipped_aces == 2 and len(parsed.dacl or ()) == 1
    assert enroll_rights(data, {ALICE, EVERYONE}).enroll


# --- malformed descriptors --------------------------------------------------------------------


def realistic_descriptor() -> bytes:
    return sd(
        deny(CAROL, ENROLL_RIGHT),
        allow(AUTHENTICATED_USERS, mask=GENERIC_READ_DS),
        allow(DOMAIN_ADMINS, mask=FULL_CONTROL),
        allow(DOMAIN_USERS, ENROLL_RIGHT),
        allow(DOMAIN_USERS, AUTOENROLL_RIGHT),
        Ace(
            AceType.ACCESS_ALLOWED_OBJECT,
            PKI_USERS,
            AccessMask.ADS_RIGHT_DS_CONTROL_ACCESS,
            object_type=ENROLL_RIGHT,
            inherited_object_type=OTHER_RIGHT,
        ),
    )


def test_every_truncation_of_a_real_descriptor_is_malformed() -> None:
    data = realistic_descriptor()
    parse_security_descriptor(data)
    for length in range(len(data)):
        with pytest.raises(MalformedSecurityDescriptor):
            enroll_rights(data[:length], {ALICE})


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    patched = bytearray(data)
    struct.pack_into(fmt, patched, offset, value)
    return bytes(patched)


def _dacl_offset(data: bytes) -> int:
    return int(struct.unpack_from("<I", data, 16)[0])


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: _patched(d, 0, "<B", 2), id="sd-revision-2"),
        pytest.param(lambda d: _patched(d, 2, "<H", SdControl.SE_DACL_PRESENT), id="absolute-form"),
        pytest.param(lambda d: _patched(d, 4, "<I", len(d)), id="owner-offset-past-end"),
        pytest.param(lambda d: _patched(d, 4, "<I", 0xFFFFFFFF), id="owner-offset-huge"),
        pytest.param(lambda d: _patched(d, 16, "<I", 8), id="dacl-offset-inside-header"),
        pytest.param(lambda d: _patched(d, 16, "<I", len(d) - 4), id="dacl-header-cut"),
        pytest.param(
            lambda d: _patched(_patched(d, 2, "<H", 0x8014), 12, "<I", len(d)),
            id="sacl-offset-past-end",
        ),
        pytest.param(lambda d: _patched(d, _dacl_offset(d), "<B", 3), id="acl-revision-3"),
        pytest.param(lambda d: _patched(d, _dacl_offset(d) + 2, "<H", 0xFFFF), id="acl-size-huge"),
        pytest.param(lambda d: _patched(d, _dacl_offset(d) + 2, "<H", 4), id="acl-size-tiny"),
        pytest.param(lambda d: _patched(d, _dacl_offset(d) + 4, "<H", 0xFFFF), id="ace-count-huge"),
        pytest.param(lambda d: _patched(d, _dacl_offset(d) + 4, "<H", 7), id="ace-count-plus-1"),
        pytest.param(lambda d: _patched(d, _dacl_offset(d) + 10, "<H", 0), id="ace-size-0"),
        pytest.param(lambda d: _patched(d, _dacl_offset(d) + 10, "<H", 6), id="ace-size-odd"),
        pytest.param(lambda d: _patched(d, _dacl_offset(d) + 10, "<H", 0xFFFC), id="ace-size-huge"),
        pytest.param(lambda d: _patched(d, _dacl_offset(d) + 10, "<H", 12), id="ace-cut-in-guid"),
        pytest.param(lambda d: _patched(d, _dacl_offset(d) + 16, "<I", 3), id="guids-past-ace"),
        pytest.param(lambda d: _patched(d, SD_OWNER_SID + 1, "<B", 200), id="owner-sid-count"),
        pytest.param(lambda d: _patched(d, SD_OWNER_SID, "<B", 9), id="owner-sid-revision"),
        pytest.param(lambda d: d + bytes(132096), id="oversized"),
    ],
)
def test_inconsistent_descriptors_are_malformed(mutate: Callable[[bytes], bytes]) -> None:
    data = mutate(realistic_descriptor())
    with pytest.raises(MalformedSecurityDescriptor):
        enroll_rights(data, {ALICE})


def test_random_corruption_never_escapes_as_another_exception() -> None:
    original = realistic_descriptor()
    rng = random.Random(20240517)
    outcomes = {"parsed": 0, "malformed": 0}
    for _ in range(3000):
        data = bytearray(original)
        for _flip in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            enroll_rights(bytes(data), {ALICE, DOMAIN_USERS})
            outcomes["parsed"] += 1
        except MalformedSecurityDescriptor:
            outcomes["malformed"] += 1
    assert outcomes["parsed"] and outcomes["malformed"]


# --- flags and attribute encodings ------------------------------------------------------------


def test_flag_values_are_those_of_ms_crtd() -> None:
    assert int(CertificateNameFlag.ENROLLEE_SUPPLIES_SUBJECT) == 0x1
    assert int(CertificateNameFlag.SUBJECT_ALT_REQUIRE_UPN) == 0x02000000
    assert int(CertificateNameFlag.SUBJECT_REQUIRE_DNS_AS_CN) == 0x10000000
    assert int(CertificateNameFlag.SUBJECT_REQUIRE_DIRECTORY_PATH) == 0x80000000
    assert int(EnrollmentFlag.PEND_ALL_REQUESTS) == 0x2
    assert int(EnrollmentFlag.AUTO_ENROLLMENT) == 0x20
    assert int(EnrollmentFlag.NO_SECURITY_EXTENSION) == 0x80000


def test_flag_words_round_trip_through_ads_signed_integers() -> None:
    word = (
        CertificateNameFlag.SUBJECT_REQUIRE_DIRECTORY_PATH
        | CertificateNameFlag.SUBJECT_ALT_REQUIRE_UPN
    )
    assert to_ad_int32(word) == -2113929216
    assert CertificateNameFlag(from_ad_int32(-2113929216)) == word
    assert to_ad_int32(0x20) == 0x20
    with pytest.raises(MalformedAttributeValue):
        from_ad_int32(1 << 32)


def test_template_periods_are_ads_negative_filetime_intervals() -> None:
    # The bytes AD holds for the default one-year validity and six-week renewal period.
    year = bytes.fromhex("004039872ee1feff")
    six_weeks = bytes.fromhex("0080a60affdeffff")
    assert interval_to_filetime(timedelta(days=365)) == year
    assert interval_to_filetime(timedelta(weeks=6)) == six_weeks
    assert filetime_to_interval(year) == timedelta(days=365)
    for bad in (bytes(7), bytes(8), (1).to_bytes(8, "little")):
        with pytest.raises(MalformedAttributeValue):
            filetime_to_interval(bad)


def test_key_usage_bytes_hold_the_bit_string_in_order() -> None:
    usage = KeyUsage.DIGITAL_SIGNATURE | KeyUsage.KEY_ENCIPHERMENT
    assert key_usage_to_bytes(usage) == bytes.fromhex("a000")
    assert key_usage_from_bytes(bytes.fromhex("a0")) == usage
    assert key_usage_from_bytes(bytes.fromhex("0080")) == KeyUsage.DECIPHER_ONLY
