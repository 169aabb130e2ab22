"""C-1 name rules, WP-5 reserved names and the subject-token encoding (commands/names.py).

Pure: no I/O. Every check asserts concrete values, so a changed rule fails here.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from runledger.commands import work_pools as wp
from runledger.commands.names import (
    BANNED_NAME_CHARACTERS,
    MAX_NAME_LENGTH,
    check_object_name,
    check_work_pool_name,
    decode_token,
    encode_token,
    is_reserved_work_pool_name,
)

EMPTYISH_MESSAGE = "name cannot be an empty string"
TOKEN_FORBIDDEN = set(".*>") | set(string.whitespace)
TOKEN_ALPHABET = set(string.ascii_letters + string.digits + "_-~")
CONTROL_CHARACTERS = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]}


def _messages(exc: ValidationError) -> list[str]:
    return [e["msg"] for e in exc.errors()]


# ---------------------------------------------------------------------------------------------
# C-1: banned characters


def test_banned_characters_are_exactly_the_five_of_the_spec():
    assert set(BANNED_NAME_CHARACTERS) == {"/", "%", "&", ">", "<"}
    assert MAX_NAME_LENGTH == 255


@pytest.mark.parametrize("bad", list("/%&><"))
@pytest.mark.parametrize("template", ["{}", "a{}", "{}b", "a{}b", "  {}  "])
def test_every_banned_character_anywhere_is_rejected(bad, template):
    name = template.format(bad)
    with pytest.raises(ValueError) as info:
        check_object_name(name)
    assert bad in str(info.value)
    with pytest.raises(ValueError):
        check_work_pool_name(name)


@pytest.mark.parametrize(
    "good",
    ["a", "default", "my queue", "with.dots", "star*", "ünïcødé", "日本語", "a-b_c", "'quoted'",
     "#hash", "?q", "+plus", "~tilde", "x" * MAX_NAME_LENGTH],
)
def test_names_without_banned_characters_are_kept_verbatim(good):
    assert check_object_name(good) == good
    assert check_work_pool_name(good) == good


def test_object_names_must_not_be_empty_but_may_be_blank():
    with pytest.raises(ValueError):
        check_object_name("")
    # Only pools have the emptyish rule: a queue named " " or "''" is allowed (Prefect's `Name`).
    for blank in (" ", "''", '"', "' ' "):
        assert check_object_name(blank) == blank


@given(st.text(max_size=40))
@settings(max_examples=200)
def test_object_name_rule_is_exactly_nonempty_and_no_banned_or_control_character(name):
    ok = bool(name) and not set(name) & (set(BANNED_NAME_CHARACTERS) | CONTROL_CHARACTERS)
    try:
        check_object_name(name)
    except ValueError:
        assert not ok
    else:
        assert ok


# ---------------------------------------------------------------------------------------------
# C-1: emptyish work pool names


@pytest.mark.parametrize("emptyish", ["", " ", "  ", "''", '""', "' ' ", "\"'\"", " ' \" ' ", "'", '"'])
def test_emptyish_pool_names_are_rejected_with_the_exact_message(emptyish):
    with pytest.raises(ValueError) as info:
        check_work_pool_name(emptyish)
    assert str(info.value) == EMPTYISH_MESSAGE


@pytest.mark.parametrize("emptyish", ["", " ", "''", "' ' "])
def test_emptyish_pool_names_are_rejected_by_every_pool_command(emptyish):
    payloads = [
        (wp.CreateWorkPool, {"name": emptyish}),
        (wp.UpdateWorkPool, {"name": emptyish}),
        (wp.DeleteWorkPool, {"name": emptyish}),
        (wp.CreateWorkQueue, {"work_pool_name": emptyish, "name": "q"}),
        (wp.SetWorkQueuePriorities, {"work_pool_name": emptyish, "priorities": {}}),
    ]
    for model, payload in payloads:
        with pytest.raises(ValidationError) as info:
            model.model_validate(payload, strict=True)
        assert _messages(info.value) == [f"Value error, {EMPTYISH_MESSAGE}"], model


@pytest.mark.parametrize("name", ["a", " a ", "'a'", '"x"', ". ", "0", "\u00a0"])
def test_pool_names_with_anything_but_spaces_and_quotes_are_not_emptyish(name):
    # The rule strips spaces and quotes only (Prefect: `value.strip("' \"")`).
    assert check_work_pool_name(name) == name


@pytest.mark.parametrize("control", ["\x00", "\t", "\n", "\r", "\x1b", "\x1f", "\x7f", "\x80", "\x85", "\x9f"])
@pytest.mark.parametrize("template", ["{}", "a{}", "{}b", "a{}b"])
def test_control_characters_anywhere_in_a_name_are_rejected(control, template):
    name = template.format(control)
    for check in (check_object_name, check_work_pool_name):
        with pytest.raises(ValueError) as info:
            check(name)
        assert f"U+{ord(control):04X}" in str(info.value)


@given(st.text(alphabet=" '\"", max_size=12))
def test_any_mix_of_spaces_and_quotes_is_emptyish(name):
    with pytest.raises(ValueError) as info:
        check_work_pool_name(name)
    assert str(info.value) == EMPTYISH_MESSAGE


def test_emptyish_check_does_not_hide_banned_characters():
    with pytest.raises(ValueError) as info:
        check_work_pool_name(" / ")
    assert str(info.value) != EMPTYISH_MESSAGE and "/" in str(info.value)


def test_oversized_names_are_rejected_by_the_command_models():
    assert wp.CreateWorkPool(name="p" * 255).name == "p" * 255
    with pytest.raises(ValidationError) as info:
        wp.CreateWorkPool.model_validate_json('{"name": "' + "p" * 256 + '"}', strict=True)
    assert info.value.errors()[0]["type"] == "string_too_long"
    with pytest.raises(ValidationError):
        wp.CreateWorkQueue(work_pool_name="p", name="q" * 256)
    assert wp.CreateWorkQueue(work_pool_name="p", name="q" * 255).name == "q" * 255


# ---------------------------------------------------------------------------------------------
# WP-5 reserved names


@pytest.mark.parametrize(
    "name", ["prefect", "Prefect", "PREFECT", "prefect-pool", "PrefectPool", "prefect pool", "pReFeCt_x"]
)
def test_names_starting_with_prefect_in_any_case_are_reserved(name):
    assert is_reserved_work_pool_name(name) is True


@pytest.mark.parametrize("name", ["my-prefect", " prefect", "prefec", "perfect", "default-agent-pool", "p", "xprefect"])
def test_other_names_are_not_reserved(name):
    assert is_reserved_work_pool_name(name) is False


# ---------------------------------------------------------------------------------------------
# Subject tokens


@pytest.mark.parametrize(
    "value, token",
    [
        ("", "~"),
        ("abc", "abc"),
        ("A-Z_09", "A-Z_09"),
        (".", "~2E"),
        ("a.b", "a~2Eb"),
        ("*", "~2A"),
        (">", "~3E"),
        (" ", "~20"),
        ("~", "~7E"),
        ("é", "~C3~A9"),
        ("default-agent-pool", "default-agent-pool"),
        ("my pool", "my~20pool"),
    ],
)
def test_known_encodings(value, token):
    assert encode_token(value) == token
    assert decode_token(token) == value


@given(st.text())
@settings(max_examples=300)
def test_encode_decode_round_trip(value):
    token = encode_token(value)
    assert decode_token(token) == value


@given(st.text())
@settings(max_examples=300)
def test_encoded_tokens_are_valid_subject_tokens(value):
    token = encode_token(value)
    assert token  # never empty: an empty token would break the subject
    assert not set(token) & TOKEN_FORBIDDEN
    assert set(token) <= TOKEN_ALPHABET
    assert token.isascii()


@given(st.text(), st.text())
def test_encoding_is_injective(a, b):
    if a != b:
        assert encode_token(a) != encode_token(b)


@given(st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1))
def test_safe_strings_encode_to_themselves(value):
    assert encode_token(value) == value


@pytest.mark.parametrize("bad", ["~4", "a~", "~ZZ", "a.b", "a b", "*", ">", "~FF"])
def test_malformed_tokens_are_refused(bad):
    with pytest.raises(ValueError):
        decode_token(bad)
