"""Secret masking: every encoding of a secret, and a DSN's password, comes out as ``***``.

Leaks are produced here with the standard library (``repr``, ``json``,
``urllib.parse``, ``base64``), never from the masker's own list of forms,
and masked through a real :class:`~mikros_trio._telemetry.Telemetry`.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import leak_forms
from mikros_trio._secrets import NOISY_MIN, Masker, secret_forms, secret_parts
from mikros_trio._telemetry import Telemetry

#: Quotes, a backslash, non-ASCII (two- and three-byte UTF-8), a space,
#: URL delimiters and HTML-significant characters.
NASTY = "p\"a's\\s é€ w/+&<:@%9"

PASSWORD = 'dbp@ss:w"rd/é%1 x'
DSN = f"postgresql://app:{urllib.parse.quote(PASSWORD, safe='')}@db.internal:5432/items"


def hub(*secrets: str) -> Telemetry:
    """A telemetry hub with ``secrets`` registered, as the env feature registers them."""
    telemetry = Telemetry("unit")
    for secret in secrets:
        telemetry.add_secrets([secret], name="TOKEN")
    return telemetry


def basic(user: str, password: str) -> str:
    """An HTTP ``Basic`` credentials value."""
    return base64.b64encode(f"{user}:{password}".encode()).decode()


#: Ways code writes a secret ``s`` into a longer text, as a user's handler would.
LEAKS: dict[str, Callable[[str], str]] = {
    "%r": lambda s: "token %r" % (s,),  # noqa: UP031 - the logging style is the point
    "%a": lambda s: "token %a" % (s,),  # noqa: UP031
    "repr, both quotes": lambda s: repr("it's \"" + s),
    "repr of a dict": lambda s: repr({"token": s}),
    "bytes %r": lambda s: f"sent {s.encode()!r}",
    "bytes, both quotes": lambda s: repr(b"'\"" + s.encode()),
    "hex": lambda s: s.encode().hex(),
    "HEX": lambda s: s.encode().hex().upper(),
    "json": lambda s: json.dumps({"token": s}),
    "json utf-8": lambda s: json.dumps({"token": s}, ensure_ascii=False),
    "json html-safe": lambda s: json.dumps(s).replace("<", "\\u003c").replace("&", "\\u0026"),
    "quote": lambda s: "/x/" + urllib.parse.quote(s),
    "quote component": lambda s: "/x/" + urllib.parse.quote(s, safe=""),
    "quote rfc 3986 path": lambda s: urllib.parse.quote(s, safe="!$&'()*+,;=:@"),
    "quote_plus": lambda s: "?t=" + urllib.parse.quote_plus(s),
    "urlencode": lambda s: urllib.parse.urlencode({"a": 1, "token": s}),
    "userinfo": lambda s: f"https://app:{urllib.parse.quote(s, safe='')}@host/",
    "base64": lambda s: base64.b64encode(s.encode()).decode(),
    "urlsafe base64": lambda s: base64.urlsafe_b64encode(s.encode()).decode(),
    "basic, user of 3": lambda s: basic("app", s),
    "basic, user of 4": lambda s: basic("app1", s),
    "basic, user of 5": lambda s: basic("app12", s),
}


@pytest.mark.parametrize("leak", LEAKS, ids=str)
def test_every_encoding_of_a_secret_is_masked(leak: str) -> None:
    """A secret written each way Python, JSON and URLs write it is masked in the text."""
    text = LEAKS[leak](NASTY)
    masked = hub(NASTY).redact(f"before {text} after")
    assert "***" in masked, masked
    assert NASTY not in masked
    for form in leak_forms(NASTY).values():
        assert form not in masked, (form, masked)


def test_a_dsn_password_is_masked_as_every_program_sees_it() -> None:
    """The DSN, its password as urlsplit returns it, decoded, in a conninfo and in JSON."""
    telemetry = hub(DSN)
    parsed = urllib.parse.urlsplit(DSN)
    password = parsed.password
    assert password is not None
    leaks = [
        DSN,
        str(parsed),
        password,
        urllib.parse.unquote(password),
        f"host=db.internal user=app password={PASSWORD!r}",
        "password='" + PASSWORD.replace("\\", "\\\\").replace("'", "\\'") + "'",
        json.dumps({"password": PASSWORD}),
        basic("app", PASSWORD),
    ]
    for leak in leaks:
        masked = telemetry.redact(f"connecting with {leak}")
        assert PASSWORD not in masked
        assert password not in masked
        assert "***" in masked, leak
    assert telemetry.redact("db.internal:5432 as app") == "db.internal:5432 as app"


@pytest.mark.parametrize(
    ("secret", "parts"),
    [
        (DSN, [(urllib.parse.quote(PASSWORD, safe=""), False), (PASSWORD, True)]),
        ("redis://:pw%21zz@cache:6379/0", [("pw%21zz", False), ("pw!zz", True)]),
        ("postgresql://db/items?user=app&password=s3cret-q", [("s3cret-q", True)]),
        ("host=db password='it\\'s a pass' user=app", [("it's a pass", True)]),
        ("host=db password=plain-pass user=app", [("plain-pass", True)]),
        ("https://api.example/v1", []),
        ("http://[::1:bad/", []),
    ],
)
def test_secret_parts_find_the_password_inside(secret: str, parts: list[tuple[str, bool]]) -> None:
    """A URL's or conninfo's password is a part (with whether a program uses it decoded)."""
    assert secret_parts(secret) == parts


def test_a_short_secret_is_masked_and_named_weak() -> None:
    """A secret under 8 characters is still masked, named weak, and gets no hex or base64 form."""
    telemetry = hub("abc")
    assert telemetry.redact("x abc y 'abc'") == "x *** y '***'"
    assert telemetry.weak_secrets == ("TOKEN",)
    assert telemetry.redact("616263 YWJj") == "616263 YWJj"
    assert b"abc".hex() not in secret_forms("abc")
    long_enough = "a" * NOISY_MIN
    assert long_enough.encode().hex() in secret_forms(long_enough)


def test_a_short_dsn_password_is_named_weak_after_its_variable() -> None:
    """A DSN whose password is short is named weak by the variable, never by the value."""
    telemetry = Telemetry("unit")
    telemetry.add_secrets(["postgresql://app:pw@db/items"], name="DB_DSN")
    assert telemetry.weak_secrets == ("the password in DB_DSN",)
    assert telemetry.redact("password=pw") == "password=***"


def test_undecodable_environment_bytes_are_masked_as_bytes() -> None:
    """A value holding non-UTF-8 bytes (surrogate-escaped by os.environ) masks those bytes."""
    raw = b"tok\xffen-1234"
    secret = raw.decode("utf-8", "surrogateescape")
    telemetry = hub(secret)
    assert telemetry.redact(f"sent {raw!r}") == "sent b'***'"
    assert telemetry.redact(raw.hex()) == "***"


def test_a_secret_containing_another_is_masked_whole() -> None:
    """Longest first: the longer secret is masked as one, not as a shorter one plus a rest."""
    telemetry = hub("token-1234", "token-1234-and-more")
    assert telemetry.redact("a token-1234-and-more b token-1234") == "a *** b ***"


def test_without_secrets_texts_come_back_as_they_are() -> None:
    """No secret registered: redact returns the very same text, and there is no masker."""
    telemetry = Telemetry("unit")
    text = "nothing to hide"
    assert telemetry.redact(text) is text
    assert telemetry.masker is None
    assert not Masker()


def test_shows_agrees_with_mask() -> None:
    """shows() is true exactly for the texts mask() changes."""
    masker = Masker([(NASTY, "TOKEN")])
    for text in ("plain text", "p", f"x {NASTY!r}", "a" * 500 + json.dumps(NASTY)):
        assert masker.shows(text) == (masker.mask(text) != text)


# '*' is left out: a secret made of it would show in the mask itself.
SECRETS = st.text(st.characters(exclude_characters="*", exclude_categories=["Cs"]), min_size=1)


@given(secret=SECRETS, before=st.text(max_size=5), after=st.text(max_size=5))
def test_no_form_of_any_secret_survives_masking(secret: str, before: str, after: str) -> None:
    """For any secret and any text around it, no form of it is left once masked."""
    masker = Masker([(secret, "TOKEN")])
    forms = leak_forms(secret)
    if len(secret.encode()) < NOISY_MIN:  # by policy: no hex or base64 for short secrets
        forms = {name: form for name, form in forms.items() if "hex" not in name.lower()}
        forms = {name: form for name, form in forms.items() if "base64" not in name}
    for name, form in forms.items():
        masked = masker.mask(before + form + after)
        assert form not in masked, (name, form, masked)
