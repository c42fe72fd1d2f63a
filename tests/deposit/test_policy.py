"""Deposit policy: identifier, datatype, metadata and stored name of one input.

Each table row is one input and the one result it must give: a value, or the
``Rejected(code)`` the input must be refused with.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

import pytest

from nbankd.deposit.policy import (
    AUTO_ID_LENGTH,
    InboxRules,
    PolicyError,
    Sidecar,
    auto_identifier,
    choose_dtype,
    merge_metadata,
    parse_sidecar,
    plan,
    target_name,
)

TOKEN = bytes(range(16))
OTHER_TOKEN = bytes(range(100, 116))
RULES = InboxRules(dtype="vocalization-wav")


@dataclass(frozen=True)
class Rejected:
    code: str


def _name_or_code(relpath: str, rules: InboxRules, sidecar: Sidecar, **kw: object) -> object:
    try:
        return plan(relpath, rules, sidecar, token=TOKEN, **kw).name
    except PolicyError as err:
        return Rejected(err.code)


# -- identifiers from file names -------------------------------------------------------

FILE_NAME_IDENTIFIERS = [
    ("rec1.wav", "rec1"),
    ("bird7/day3/rec1.wav", "rec1"),
    ("rec_1-2.wav", "rec_1-2"),
    ("REC1.WAV", "REC1"),
    ("noextension", "noextension"),
    ("-x.wav", "-x"),
    ("a.b.wav", Rejected("invalid-name")),
    ("my rec.wav", Rejected("invalid-name")),
    (" rec1.wav", Rejected("invalid-name")),
    ("réc1.wav", Rejected("invalid-name")),
    ("日本.wav", Rejected("invalid-name")),
    ("١٢٣.wav", Rejected("invalid-name")),
    ("rec1\n.wav", Rejected("invalid-name")),
    ("rec\n1.wav", Rejected("invalid-name")),
    ("rec1~.wav", Rejected("invalid-name")),
    ("~rec1.wav", Rejected("invalid-name")),
    (".hidden", Rejected("invalid-name")),
    ("rec1..wav", Rejected("invalid-name")),
    ("a" * 251 + ".wav", "a" * 251),
    ("a" * 255, "a" * 255),
    ("a" * 256, Rejected("invalid-name")),
    ("a" * 256 + ".wav", Rejected("invalid-name")),
]


@pytest.mark.parametrize(("relpath", "expected"), FILE_NAME_IDENTIFIERS)
def test_identifier_from_file_name(relpath: str, expected: object) -> None:
    """A file's identifier is its name without the last extension, if it is a valid slug."""
    assert _name_or_code(relpath, RULES, Sidecar()) == expected


def test_invalid_name_error_names_the_file_and_gives_a_hint() -> None:
    """An invalid-name rejection quotes the offending name and says how to fix it."""
    with pytest.raises(PolicyError) as info:
        plan("my rec.wav", RULES, Sidecar(), token=TOKEN)
    assert "'my rec'" in info.value.message
    assert "sidecar" in info.value.hint


# -- identifiers from sidecars ------------------------------------------------------------

SIDECAR_IDENTIFIERS = [
    ("rec1.wav", "custom_id", "custom_id"),
    ("my rec.wav", "my_rec", "my_rec"),
    ("a.b.wav", "a-b", "a-b"),
    ("rec1.wav", "../../etc/passwd", Rejected("invalid-name")),
    ("rec1.wav", "sub/name", Rejected("invalid-name")),
    ("rec1.wav", "", Rejected("invalid-name")),
    ("rec1.wav", "with space", Rejected("invalid-name")),
    ("rec1.wav", "tilde~1", Rejected("invalid-name")),
    ("rec1.wav", "trailing\n", Rejected("invalid-name")),
    ("rec1", "x" * 255, "x" * 255),  # no extension: the stored name is the id
    ("rec1.wav", "x" * 251, "x" * 251),  # with ".wav": 255 bytes, as a file name holds
    ("rec1.wav", "x" * 252, Rejected("invalid-name")),  # stored name 256 bytes
    ("rec1.wav", "x" * 256, Rejected("invalid-name")),
]


@pytest.mark.parametrize(("relpath", "sidecar_id", "expected"), SIDECAR_IDENTIFIERS)
def test_sidecar_id_overrides_file_name(relpath: str, sidecar_id: str, expected: object) -> None:
    """A sidecar 'id' replaces the file-name identifier and must itself be a valid slug."""
    assert _name_or_code(relpath, RULES, Sidecar(id=sidecar_id)) == expected


def test_sidecar_id_wins_over_auto_id() -> None:
    """A sidecar 'id' is used even when the inbox asks for automatic identifiers."""
    rules = InboxRules(dtype="d", auto_id=True)
    assert plan("rec1.wav", rules, Sidecar(id="chosen"), token=TOKEN).name == "chosen"


# -- automatic identifiers ------------------------------------------------------------


@pytest.mark.parametrize("id_type", [None, "base36"])
def test_auto_id_is_eight_lowercase_base36_chars(id_type: str | None) -> None:
    """Automatic identifiers look like the registry's: 8 characters of [0-9a-z]."""
    name = auto_identifier(TOKEN, id_type)
    assert AUTO_ID_LENGTH == 8
    assert re.fullmatch(r"[0-9a-z]{8}", name), name


def test_auto_id_is_deterministic_for_a_token() -> None:
    """The same token always gives the same identifier (so registering can be replayed)."""
    assert auto_identifier(TOKEN, None) == auto_identifier(bytes(TOKEN), None)


def test_auto_id_differs_for_different_tokens() -> None:
    """Different tokens give different identifiers."""
    assert auto_identifier(TOKEN, None) != auto_identifier(OTHER_TOKEN, None)


def test_auto_id_uuid_form() -> None:
    """With auto_id_type 'uuid' the identifier is a canonical UUID4 string."""
    name = auto_identifier(TOKEN, "uuid")
    parsed = uuid.UUID(name)
    assert parsed.version == 4
    assert str(parsed) == name
    assert auto_identifier(TOKEN, "uuid") == name
    assert auto_identifier(OTHER_TOKEN, "uuid") != name


def test_auto_id_refuses_short_tokens() -> None:
    """A token shorter than 16 bytes is a programming error, not a weak identifier."""
    with pytest.raises(ValueError):
        auto_identifier(b"short", None)


AUTO_ID_PLANS = [
    ("my rec.wav", None, True, r"[0-9a-z]{8}\.wav"),
    ("a.b.wav", None, True, r"[0-9a-z]{8}\.wav"),
    ("rec1.wav", None, False, r"[0-9a-z]{8}"),
    (
        "rec1.wav",
        "uuid",
        True,
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\.wav",
    ),
]


@pytest.mark.parametrize(("relpath", "id_type", "keep", "target_re"), AUTO_ID_PLANS)
def test_auto_id_replaces_file_name(
    relpath: str, id_type: str | None, keep: bool, target_re: str
) -> None:
    """With auto_id the file name is ignored (even an invalid one) and the token decides."""
    rules = InboxRules(dtype="d", auto_id=True, auto_id_type=id_type, keep_extensions=keep)
    result = plan(relpath, rules, Sidecar(), token=TOKEN)
    assert result.name == auto_identifier(TOKEN, id_type)
    assert re.fullmatch(target_re, result.target_name), result.target_name


# -- datatype ------------------------------------------------------------------------

BY_EXT = {".pprox": "spikes-pprox", ".wav": "ext-wav"}

DTYPE_CHOICES = [
    # (relpath, inbox dtype, dtype_by_extension, sidecar dtype, expected)
    ("rec1.wav", "inbox-dt", BY_EXT, "side-dt", "side-dt"),
    ("rec1.wav", None, {}, "side-dt", "side-dt"),
    ("rec1.wav", "inbox-dt", BY_EXT, None, "ext-wav"),
    ("rec1.WAV", "inbox-dt", BY_EXT, None, "ext-wav"),
    ("rec1.PpRoX", None, BY_EXT, None, "spikes-pprox"),
    ("bird/rec1.pprox", "inbox-dt", BY_EXT, None, "spikes-pprox"),
    ("rec1.txt", "inbox-dt", BY_EXT, None, "inbox-dt"),
    ("noext", "inbox-dt", BY_EXT, None, "inbox-dt"),
    ("rec1.wav.bak", "inbox-dt", BY_EXT, None, "inbox-dt"),
    ("rec1.txt", None, BY_EXT, None, Rejected("no-dtype")),
    ("noext", None, BY_EXT, None, Rejected("no-dtype")),
    ("rec1.wav", None, {}, None, Rejected("no-dtype")),
]


@pytest.mark.parametrize(("relpath", "dtype", "by_ext", "side", "expected"), DTYPE_CHOICES)
def test_dtype_choice_order(
    relpath: str, dtype: str | None, by_ext: dict[str, str], side: str | None, expected: object
) -> None:
    """Datatype: sidecar, else extension mapping (any case), else inbox dtype, else no-dtype."""
    rules = InboxRules(dtype=dtype, dtype_by_extension=by_ext)
    try:
        got: object = choose_dtype(relpath, rules, Sidecar(dtype=side))
    except PolicyError as err:
        got = Rejected(err.code)
    assert got == expected


def test_plan_uses_the_chosen_dtype() -> None:
    """plan() records the datatype choose_dtype picks."""
    rules = InboxRules(dtype="inbox-dt", dtype_by_extension=BY_EXT)
    assert plan("rec1.pprox", rules, Sidecar(), token=TOKEN).dtype == "spikes-pprox"


def test_plan_without_dtype_is_rejected_no_dtype() -> None:
    """plan() refuses an input no datatype applies to with code no-dtype."""
    with pytest.raises(PolicyError) as info:
        plan("rec1.wav", InboxRules(dtype=None), Sidecar(), token=TOKEN)
    assert info.value.code == "no-dtype"


def test_an_extension_that_is_not_utf8_is_rejected_invalid_name() -> None:
    """A stored name keeping undecodable extension bytes is refused with invalid-name,
    naming the file: the journal and registry keep names as text."""
    with pytest.raises(PolicyError) as info:
        plan("rec1.w\udcffv", RULES, Sidecar(), token=TOKEN)
    assert info.value.code == "invalid-name" and "rec1.w" in info.value.message


def test_an_extension_that_is_not_utf8_is_dropped_without_keep_extensions() -> None:
    """Without keep_extensions the stored name is the identifier alone: deposited."""
    rules = InboxRules(dtype="vocalization-wav", keep_extensions=False)
    assert plan("rec1.w\udcffv", rules, Sidecar(), token=TOKEN).target_name == "rec1"


# -- metadata ------------------------------------------------------------------------

PATH_RE = re.compile(r"^(?P<bird>[^/]+)/(?:(?P<day>day\d+)/)?")

METADATA_MERGES = [
    # (relpath, inbox metadata, path_metadata, sidecar metadata, expected)
    ("rec1.wav", {"rig": "rig3"}, None, {}, {"rig": "rig3"}),
    ("b1/rec1.wav", {"rig": "rig3"}, PATH_RE, {}, {"rig": "rig3", "bird": "b1"}),
    ("b1/day2/r.wav", {"bird": "inbox"}, PATH_RE, {}, {"bird": "b1", "day": "day2"}),
    ("b1/rec1.wav", {"day": "keep"}, PATH_RE, {}, {"bird": "b1", "day": "keep"}),
    ("b1/rec1.wav", {"bird": "x", "rig": "r"}, PATH_RE, {"bird": "s"}, {"bird": "s", "rig": "r"}),
    ("rec1.wav", {"rig": "rig3"}, PATH_RE, {}, {"rig": "rig3"}),
    ("rec1.wav", {}, PATH_RE, {"n": 1}, {"n": 1}),
    ("rec1.wav", {"a": 1}, None, {"a": None}, {"a": None}),
]


@pytest.mark.parametrize(("relpath", "inbox", "path_re", "side", "expected"), METADATA_MERGES)
def test_metadata_merge_order(
    relpath: str,
    inbox: dict[str, object],
    path_re: re.Pattern[str] | None,
    side: dict[str, object],
    expected: dict[str, object],
) -> None:
    """Metadata: inbox, overridden by path_metadata groups, overridden by the sidecar."""
    rules = InboxRules(dtype="d", metadata=inbox, path_metadata=path_re)
    assert merge_metadata(relpath, rules, Sidecar(metadata=side)) == expected


def test_plan_metadata_is_canonical_json() -> None:
    """plan() stores the merged metadata as sorted-key JSON that reads back equal."""
    rules = InboxRules(dtype="d", metadata={"z": 1, "a": 2}, path_metadata=PATH_RE)
    result = plan("b1/rec1.wav", rules, Sidecar(metadata={"m": [1, 2]}), token=TOKEN)
    expected = {"a": 2, "bird": "b1", "m": [1, 2], "z": 1}
    assert result.metadata == expected
    assert result.metadata_json == json.dumps(expected, sort_keys=True)


def test_plan_does_not_mutate_inbox_metadata() -> None:
    """Merging never changes the inbox's own metadata mapping."""
    inbox = {"rig": "rig3"}
    rules = InboxRules(dtype="d", metadata=inbox, path_metadata=PATH_RE)
    plan("b1/rec1.wav", rules, Sidecar(metadata={"rig": "other"}), token=TOKEN)
    assert inbox == {"rig": "rig3"}


def test_plan_with_non_string_sidecar_metadata_keys_is_a_policy_error() -> None:
    """A sidecar whose metadata has non-string keys is rejected as bad-sidecar, not a crash."""
    sidecar_text = "metadata: {1: one, 2024-01-01: day}\n"
    rules = InboxRules(dtype="d", metadata={"rig": "rig3"})
    with pytest.raises(PolicyError) as info:
        sidecar = parse_sidecar(sidecar_text, json_format=False, source="rec1.wav.nbank.yaml")
        plan("rec1.wav", rules, sidecar, token=TOKEN)
    assert info.value.code == "bad-sidecar"


# -- stored name ---------------------------------------------------------------------

TARGET_NAMES = [
    # (identifier, source basename, keep_extensions, is_dir, expected)
    ("rec1", "rec1.wav", True, False, "rec1.wav"),
    ("rec1", "rec1.wav", False, False, "rec1"),
    ("custom", "rec1.WAV", True, False, "custom.WAV"),
    ("abcd1234", "my rec.pprox", True, False, "abcd1234.pprox"),
    ("noext", "noext", True, False, "noext"),
    ("session_01", "session_01", True, True, "session_01"),
    ("session_01", "session_01.d", True, True, "session_01"),
    ("session_01", "session_01", False, True, "session_01"),
]


@pytest.mark.parametrize(("name", "basename", "keep", "is_dir", "expected"), TARGET_NAMES)
def test_target_name(name: str, basename: str, keep: bool, is_dir: bool, expected: str) -> None:
    """The stored name is the identifier plus the source's last extension when kept (files)."""
    assert target_name(name, basename, keep_extensions=keep, is_dir=is_dir) == expected


@pytest.mark.parametrize(("keep", "expected"), [(True, "rec1.wav"), (False, "rec1")])
def test_plan_target_name_follows_keep_extensions(keep: bool, expected: str) -> None:
    """plan() stores a file under its identifier, with its extension only if kept."""
    rules = InboxRules(dtype="d", keep_extensions=keep)
    assert plan("b/rec1.wav", rules, Sidecar(), token=TOKEN).target_name == expected


# -- directories ---------------------------------------------------------------------

DIRECTORY_PLANS = [
    # (relpath, allow_directories, expected (name, target) or Rejected)
    ("session_01", False, Rejected("directory-not-allowed")),
    ("bad name", False, Rejected("directory-not-allowed")),
    ("session_01", True, ("session_01", "session_01")),
    ("bird/session_01", True, ("session_01", "session_01")),
    ("session.01", True, Rejected("invalid-name")),
    ("bad name", True, Rejected("invalid-name")),
]


@pytest.mark.parametrize(("relpath", "allow", "expected"), DIRECTORY_PLANS)
def test_directory_plan(relpath: str, allow: bool, expected: object) -> None:
    """A folder is refused unless the archive allows it; its whole name is the identifier."""
    rules = InboxRules(dtype="d", allow_directories=allow, directory_resource=True)
    try:
        result = plan(relpath, rules, Sidecar(), token=TOKEN, is_dir=True)
        got: object = (result.name, result.target_name)
    except PolicyError as err:
        got = Rejected(err.code)
    assert got == expected


def test_directory_not_allowed_wins_over_a_sidecar_id() -> None:
    """A sidecar id does not make a forbidden folder acceptable."""
    rules = InboxRules(dtype="d", allow_directories=False)
    with pytest.raises(PolicyError) as info:
        plan("session_01", rules, Sidecar(id="ok"), token=TOKEN, is_dir=True)
    assert info.value.code == "directory-not-allowed"


# -- sidecars ------------------------------------------------------------------------

GOOD_SIDECARS = [
    # (text, json_format, expected)
    ("id: rec9\ndtype: dt\nmetadata: {a: 1}\n", False, Sidecar("rec9", "dt", {"a": 1})),
    ('{"id": "rec9", "dtype": "dt", "metadata": {"a": 1}}', True, Sidecar("rec9", "dt", {"a": 1})),
    ("metadata:\n  bird: b1\n", False, Sidecar(metadata={"bird": "b1"})),
    ('{"dtype": "dt"}', True, Sidecar(dtype="dt")),
    ("", False, Sidecar()),
    ("# only a comment\n", False, Sidecar()),
    ("id: null\nmetadata: null\n", False, Sidecar()),
    ("{}", True, Sidecar()),
    # dates as their text (as always registered), nested keys JSON writes as text
    ("metadata: {day: 2024-01-02}\n", False, Sidecar(metadata={"day": "2024-01-02"})),
    # numbers as written: quoted, or plain decimal
    (
        "metadata: {animal: '0417', n: 417, x: -1.5e+3}\n",
        False,
        Sidecar(metadata={"animal": "0417", "n": 417, "x": -1500.0}),
    ),
    (
        "metadata: {s: {2024-01-01: good, 3: x, true: y}}\n",
        False,
        Sidecar(metadata={"s": {"2024-01-01": "good", "3": "x", "true": "y"}}),
    ),
]


@pytest.mark.parametrize(("text", "json_format", "expected"), GOOD_SIDECARS)
def test_parse_sidecar(text: str, json_format: bool, expected: Sidecar) -> None:
    """A well-formed YAML or JSON sidecar gives its id, dtype and metadata (empty = none)."""
    assert parse_sidecar(text, json_format=json_format, source="rec1.wav.nbank") == expected


BAD_SIDECARS = [
    # (text, json_format, a phrase the message must contain)
    ("id: [unclosed\n", False, "not valid YAML"),
    ("id: rec9\n  bad: indent\n", False, "not valid YAML"),
    ("{not json", True, "not valid JSON"),
    ("", True, "not valid JSON"),
    ("- a\n- b\n", False, "must be a mapping"),
    ("just a string\n", False, "must be a mapping"),
    ("[1, 2]", True, "must be a mapping"),
    ("42", True, "must be a mapping"),
    ("id: rec9\nname: other\n", False, "unknown keys: name"),
    ('{"ID": "rec9"}', True, "unknown keys: ID"),
    ("id: 123\n", False, "'id' must be a string"),
    ("id: 2024-01-01\n", False, "'id' must be a string"),
    ("id: yes\n", False, "'id' must be a string"),
    ('{"dtype": ["a"]}', True, "'dtype' must be a string"),
    ("metadata: a string\n", False, "'metadata' must be a mapping"),
    ('{"metadata": [1, 2]}', True, "'metadata' must be a mapping"),
    ("metadata: []\n", False, "'metadata' must be a mapping"),
    ("metadata: false\n", False, "'metadata' must be a mapping"),
    ("metadata: {v: !!binary aGVsbG8=}\n", False, "'v' is a bytes"),
    ("metadata: {v: [1, !!set {a: null}]}\n", False, "'v[1]' is a set"),
    ("metadata: {gain: .nan}\n", False, "'gain' is nan, which JSON cannot hold"),
    ("metadata: {s: {x: -.inf}}\n", False, "'s.x' is -inf"),
    ("metadata: {s: {yes: a, 'true': b}}\n", False, "'s.true' is given twice"),
    ("metadata: {animal: 0417}\n", False, "0417 at line 1 is not a plain decimal number"),
    ("metadata:\n  t: [1:30]\n", False, "1:30 at line 2 is not a plain decimal number"),
    ("metadata: {0x1F: a}\n", False, "YAML reads it as a hexadecimal number"),
]


@pytest.mark.parametrize(("text", "json_format", "phrase"), BAD_SIDECARS)
def test_bad_sidecar_is_rejected_naming_the_file(text: str, json_format: bool, phrase: str) -> None:
    """A malformed sidecar raises bad-sidecar with a message naming the sidecar file."""
    source = "bird/rec1.wav.nbank.json" if json_format else "bird/rec1.wav.nbank.yaml"
    with pytest.raises(PolicyError) as info:
        parse_sidecar(text, json_format=json_format, source=source)
    assert info.value.code == "bad-sidecar"
    assert source in info.value.message
    assert phrase in info.value.message


def test_many_unknown_sidecar_keys_are_named_first_few_then_counted() -> None:
    """A sidecar of 1000 unknown keys (one of them very long) names the first five,
    each cut short, and how many more: a one-line message."""
    keys = {"a" * 10_000: 1, **{f"key{n:04d}": n for n in range(999)}}
    with pytest.raises(PolicyError) as info:
        parse_sidecar(json.dumps(keys), json_format=True, source="rec1.wav.nbank.json")
    message = info.value.message
    shown = f"unknown keys: {'a' * 64}..., key0000, key0001, key0002, key0003 and 995 more"
    assert shown in message
    assert len(message) < 500


def test_policy_error_code_is_per_instance() -> None:
    """Two PolicyErrors keep their own codes (the class-level code is not shared)."""
    a, b = PolicyError("invalid-name", "a"), PolicyError("no-dtype", "b")
    assert (a.code, b.code) == ("invalid-name", "no-dtype")


@pytest.mark.parametrize(
    "text",
    ['{"metadata": {"note": "a\\u0000b"}}', '{"metadata": {"k\\u0000": 1}}',
     '{"metadata": {"takes": [1, {"x": "\\u0000"}]}}'],
)  # fmt: skip
def test_sidecar_metadata_with_a_nul_is_refused(text: str) -> None:
    """A NUL in sidecar metadata (key or text, at any depth) is refused as bad-sidecar
    before registering: PostgreSQL registries answer 500 to it, forever."""
    with pytest.raises(PolicyError) as caught:
        parse_sidecar(text, json_format=True, source="x.wav.nbank.json")
    assert caught.value.code == "bad-sidecar" and "NUL" in caught.value.message
