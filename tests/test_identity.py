from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnstream import (
    InvalidTurnInput,
    TurnIdentity,
    canonical_input_hash,
    derive_execution_id,
    parse_execution_id,
)

printable = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40
)


def test_readable_for_plain_ids() -> None:
    assert derive_execution_id("acme", "sess-42", 3) == "acme:sess-42:3"


@pytest.mark.parametrize(
    ("project", "session", "expected"),
    [
        ("a:b", "c", "a%3Ab:c:0"),
        ("a", "b:c", "a:b%3Ac:0"),
        ("{tag}", "s", "%7Btag%7D:s:0"),
        ("100%", "s", "100%25:s:0"),
        ("a/b", "s", "a%2Fb:s:0"),
        ("é", "s", "%C3%A9:s:0"),
    ],
)
def test_components_are_percent_encoded(project: str, session: str, expected: str) -> None:
    assert derive_execution_id(project, session, 0) == expected


def test_colon_split_is_not_ambiguous() -> None:
    # Without encoding both would be "a:b:c:0".
    assert derive_execution_id("a:b", "c", 0) != derive_execution_id("a", "b:c", 0)


@given(printable, printable, st.integers(min_value=0, max_value=2**53 - 1))
def test_injective_and_invertible(project: str, session: str, turn: int) -> None:
    execution_id = derive_execution_id(project, session, turn)
    assert parse_execution_id(execution_id) == (project, session, turn)
    assert "{" not in execution_id and "}" not in execution_id
    assert execution_id.count(":") == 2
    assert all(ord(ch) >= 0x20 and ord(ch) != 0x7F for ch in execution_id)


@given(printable, printable, printable, printable)
def test_distinct_inputs_distinct_ids(p1: str, s1: str, p2: str, s2: str) -> None:
    if (p1, s1) != (p2, s2):
        assert derive_execution_id(p1, s1, 1) != derive_execution_id(p2, s2, 1)


@pytest.mark.parametrize(
    ("project", "session", "turn"),
    [
        ("", "s", 0),
        ("p", "", 0),
        ("p", "s", -1),
        ("p", "s", True),
        ("p", "s", 1.0),
        ("p", "s", "1"),
        ("p\n", "s", 0),
        ("p", "s\x00", 0),
        ("p", "s\x7f", 0),
        ("p" * 257, "s", 0),
        (1, "s", 0),
        ("p", "s", 2**53),
    ],
)
def test_bad_components_are_rejected(project: object, session: object, turn: object) -> None:
    with pytest.raises(InvalidTurnInput):
        derive_execution_id(project, session, turn)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    ["", "a:b", "a:b:c:0", "a:b:-1", "a:b:01", "a:b:1.0", "a%3ab:c:0", "a%zz:b:0", "a:%FF:0",
     "a{:b:0", "a:b:٣"],
)
def test_parse_rejects_non_canonical(bad: str) -> None:
    with pytest.raises(InvalidTurnInput):
        parse_execution_id(bad)


def test_identity_validates_and_derives() -> None:
    identity = TurnIdentity("tenant", "proj", "sess", "user", 2)
    assert identity.execution_id == "proj:sess:2"
    with pytest.raises(InvalidTurnInput):
        TurnIdentity("", "proj", "sess", "user", 2)
    with pytest.raises(InvalidTurnInput):
        TurnIdentity("t", "proj", "sess", "user\r", 2)


def test_input_hash_is_canonical() -> None:
    same = canonical_input_hash({"b": [1, 2], "a": 1})
    assert canonical_input_hash({"a": 1, "b": [1, 2]}) == same
    assert canonical_input_hash({"a": 1}) != canonical_input_hash({"a": 2})
    with pytest.raises(InvalidTurnInput):
        canonical_input_hash({"a": object()})
