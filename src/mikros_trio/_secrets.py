"""Secret masking: every form a secret takes in output, derived once, masked in one pass.

A secret rarely leaks as itself. It leaks as ``repr()`` writes it (escaped
quotes, backslashes, ``\\xe9``), as the ``repr`` of its bytes, as JSON
escapes it, percent-encoded in a URL, hex- or base64-encoded in a header,
or, for a DSN, as the password a driver parsed out of it. When a secret
is registered, its forms are derived once (:func:`secret_forms`):

- the value itself;
- as it appears inside ``repr()`` and ``ascii()`` of a string, and inside
  ``repr()`` of its UTF-8 bytes (``'`` escaped or not: ``repr`` escapes
  it only in strings holding both quote kinds);
- as JSON writes it, with and without ``ensure_ascii``, and with ``<``,
  ``>``, ``&`` escaped as Go's and JavaScript's writers do;
- percent-encoded as ``urllib.parse`` writes it: ``quote`` with ``safe``
  ``""``, ``"/"`` and RFC 3986's path and userinfo characters, and
  ``quote_plus`` (upper-case hex digits, as Python, Go and browsers write);
- for secrets of :data:`NOISY_MIN` bytes or more, its UTF-8 bytes in hex
  (lower and upper case) and in base64 (standard and URL-safe alphabets,
  at each of the three alignments it can have in the encoded data, so
  ``Basic`` credentials, which put it after ``user:``, are covered);
- for a URL or DSN, the same forms of its password: decoded (what a
  driver sends; psycopg's ``password=...`` conninfo), as written in the
  URL (``urlsplit(dsn).password``; no hex or base64 of that text, which
  no program encodes), of a ``password`` query parameter, and of a
  keyword/value conninfo's ``password=``.

:class:`Masker` replaces any of them, in any text, by ``***``.

Design decisions:

- **Forms are derived, never guessed at mask time.** Every encoding here
  escapes character by character, so the form of a secret inside a longer
  string is the secret's own form: ``repr("token=" + s)`` contains the
  form derived from ``s`` alone. The one exception, base64, is handled by
  deriving only the characters the secret's bytes alone decide, at each
  alignment. A form of a form (the JSON of a ``repr``) is not derived:
  outputs mask each value before they encode it.
- **One pass, longest form first.** All forms become one compiled regular
  expression, an alternation ordered longest first, so a secret containing
  another is masked whole and no form survives intact (a match replaces
  part of any form it overlaps).
- **Cheap when nothing shows.** Texts shorter than the shortest form are
  returned at once. Others are first checked for a few needles with
  ``in``: the longest run of a secret's characters that no encoding
  changes is in all its escaped forms, and the hex and base64 forms are
  their own needles. CPython's substring search beats the regex engine
  several times over, so the regex runs only on texts that hold a needle.
- **Short secrets are masked anyway.** A value of a few characters would
  mask that text everywhere it occurs; hiding a secret matters more than
  tidy logs, so it is masked all the same, and :attr:`Masker.weak` names
  it so the logger warns at start. Hex and base64 forms are derived only
  from values of :data:`NOISY_MIN` bytes or more: shorter, they are a few
  hex digits or letters that occur by chance.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Final

__all__ = ["MASK", "NOISY_MIN", "WEAK_LENGTH", "Masker", "secret_forms", "secret_parts"]

#: What a secret is replaced by.
MASK: Final = "***"

#: Secrets shorter than this many characters are masked, and warned about.
WEAK_LENGTH: Final = 8

#: Hex and base64 forms are derived from secrets of at least this many bytes.
NOISY_MIN: Final = 8

# What a minimal percent-encoder leaves as is in a URL path segment or in
# userinfo (RFC 3986 pchar, past the unreserved characters Python never quotes).
_PCHAR: Final = "!$&'()*+,;=:@"

# Query parameters and conninfo keywords that hold a DSN's password.
_PASSWORD_KEYS: Final = frozenset({"password", "passwd", "pwd"})

# libpq keyword/value conninfo: password=value or password='quoted \' value'.
_CONNINFO_PASSWORD: Final = re.compile(
    r"(?:^|\s)(?:password|passwd|pwd)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']+)", re.IGNORECASE
)

# Characters every encoding here writes as themselves: a run of them is in every escaped form.
_PLAIN_RUN: Final = re.compile(r"[A-Za-z0-9_.~-]+")

# Go's and JavaScript's JSON writers also escape these (HTML safety).
_HTML_ESCAPES: Final = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026"}


def _utf8(text: str) -> bytes:
    """``text``'s bytes: an environment value with undecodable bytes gets them back."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _python_escaped(text: str, *, escape_quote: bool, ascii_only: bool) -> str:
    """``text`` as it appears inside ``repr()`` (or ``ascii()``) of a string holding it.

    ``repr`` escapes ``'`` only when the whole string holds both quote
    kinds, so both spellings are forms.
    """
    convert = ascii if ascii_only else repr
    quote = "\\'" if escape_quote else "'"
    return "".join(quote if char == "'" else convert(char)[1:-1] for char in text)


def _bytes_escaped(data: bytes, *, escape_quote: bool) -> str:
    """``data`` as it appears inside ``repr()`` of bytes holding it."""
    quote = "\\'" if escape_quote else "'"
    return "".join(quote if byte == 0x27 else repr(bytes((byte,)))[2:-1] for byte in data)


def _base64_cores(data: bytes) -> Iterator[str]:
    """The base64 characters ``data`` alone decides, at each of its three alignments.

    With ``offset`` bytes before it, the encoding's characters from
    ``ceil(8 * offset / 6)`` to ``floor(8 * (offset + len) / 6)`` carry only
    bits of ``data``: those are in every encoding holding ``data`` there.
    """
    for offset in range(3):
        start = -(-8 * offset // 6)
        end = 8 * (offset + len(data)) // 6
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            yield encode(bytes(offset) + data).decode("ascii")[start:end]


def _encodings(secret: str, *, noisy: bool = True) -> set[str]:
    """``secret`` as itself and as each encoding of it (hex and base64 only if ``noisy``)."""
    data = _utf8(secret)
    forms = {secret}
    for escape_quote in (True, False):
        forms.add(_python_escaped(secret, escape_quote=escape_quote, ascii_only=False))
        forms.add(_python_escaped(secret, escape_quote=escape_quote, ascii_only=True))
        forms.add(_bytes_escaped(data, escape_quote=escape_quote))
    for ensure_ascii in (True, False):
        escaped = json.dumps(secret, ensure_ascii=ensure_ascii)[1:-1]
        forms.add(escaped)
        forms.add(escaped.translate(_HTML_ESCAPES))
    for safe in ("", "/", _PCHAR):
        forms.add(urllib.parse.quote(data, safe=safe))
    forms.add(urllib.parse.quote_plus(data, safe=""))
    if noisy and len(data) >= NOISY_MIN:
        forms.add(data.hex())
        forms.add(data.hex().upper())
        forms.update(_base64_cores(data))
    forms.discard("")
    return forms


def secret_parts(secret: str) -> list[tuple[str, bool]]:
    """The secrets inside ``secret``: a URL's or a DSN's password, as written and decoded.

    ``postgresql://app:p%40ss@db/items`` holds ``p%40ss`` (what
    ``urlsplit(dsn).password`` returns) and ``p@ss`` (what a driver sends);
    a ``password`` query parameter and a keyword/value conninfo's
    ``password=`` count too. Each comes with whether it is a value a
    program uses (and may hex- or base64-encode: a ``Basic`` header) rather
    than text copied out of the URL.
    """
    parts: list[tuple[str, bool]] = []
    if "://" in secret:
        try:
            split = urllib.parse.urlsplit(secret)
            password = split.password
        except ValueError:  # not a URL after all (a bad port, a bad IPv6 host)
            split, password = None, None
        if password:
            parts += ((password, False), (urllib.parse.unquote(password), True))
        if split is not None:
            parts += (
                (value, True)
                for key, value in urllib.parse.parse_qsl(split.query)
                if key.lower() in _PASSWORD_KEYS
            )
    for match in _CONNINFO_PASSWORD.finditer(secret):
        value = match.group(1)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        parts.append((value, True))
    found: dict[str, bool] = {}
    for part, used in parts:
        if part and part != secret:
            found[part] = found.get(part, False) or used
    return list(found.items())


def _with_parts(value: str, name: str) -> list[tuple[str, str, bool]]:
    """``(text, label, noisy)`` of ``value`` and of each of its :func:`secret_parts`."""
    return [
        (value, name, True),
        *((part, f"the password in {name}", used) for part, used in secret_parts(value)),
    ]


def secret_forms(secret: str) -> set[str]:
    """Every text that shows ``secret``: itself, its encodings, and those of its parts.

    >>> "p@ss" in secret_forms("postgresql://app:p%40ss@db/items")
    True
    """
    forms: set[str] = set()
    for text, _, noisy in _with_parts(secret, ""):
        forms |= _encodings(text, noisy=noisy)
    return forms


def _needles(secret: str, forms: set[str]) -> set[str]:
    """Texts of which every form of ``secret`` holds at least one.

    The longest run of characters no encoding changes is in every escaped
    form; the forms without it (hex, base64, or all of them for a secret
    without such a run) are their own needles.
    """
    runs = _PLAIN_RUN.findall(secret)
    anchor = max(runs, key=len) if runs else ""
    if len(anchor) < 3:
        return set(forms)
    return {anchor, *(form for form in forms if anchor not in form)}


class Masker:
    """Replaces every form of every registered secret by ``***``; immutable.

    Call it (or its :attr:`mask`, one call less) on any text; :meth:`shows`
    says whether a text holds a form at all. Build a new one to add secrets
    (:meth:`with_secrets`): the hub swaps its masker in one assignment, so
    threads never see a half-built one.
    """

    __slots__ = ("mask", "secrets", "shows", "weak")

    def __init__(self, secrets: Iterable[tuple[str, str]] = ()) -> None:
        #: ``(value, name)`` of each secret, in registration order (empty values skipped).
        self.secrets: tuple[tuple[str, str], ...] = tuple(
            dict.fromkeys((value, name) for value, name in secrets if value)
        )
        forms: set[str] = set()
        needles: set[str] = set()
        weak: list[str] = []
        for value, name in self.secrets:
            for text, label, noisy in _with_parts(value, name):
                found = _encodings(text, noisy=noisy)
                forms |= found
                needles |= _needles(text, found)
                if len(text) < WEAK_LENGTH and label not in weak:
                    weak.append(label)
        #: Names of the secrets (or of their parts) shorter than :data:`WEAK_LENGTH`.
        self.weak = tuple(weak)
        #: ``text`` with every form of every secret replaced by ``***``.
        self.mask: Callable[[str], str]
        #: Whether ``text`` holds a form of a secret.
        self.shows: Callable[[str], bool]
        self.mask, self.shows = _matchers(forms, needles)

    def with_secrets(self, secrets: Iterable[tuple[str, str]]) -> Masker:
        """A masker for these secrets as well (``(value, name)`` pairs; empty values skipped)."""
        return Masker([*self.secrets, *secrets])

    def __bool__(self) -> bool:
        """Whether there is anything to mask."""
        return bool(self.secrets)

    def __call__(self, text: str) -> str:
        """``text`` with every form of every secret replaced by ``***``."""
        return self.mask(text)

    def __repr__(self) -> str:
        return f"<Masker of {len(self.secrets)} secrets>"


def _unchanged(text: str) -> str:
    return text


def _never(text: str) -> bool:
    return False


def _matchers(
    forms: set[str], needles: set[str]
) -> tuple[Callable[[str], str], Callable[[str], bool]]:
    """``mask`` and ``shows`` for ``forms``: closures, the cheapest thing to call per value."""
    if not forms:
        return _unchanged, _never
    ordered = sorted(forms, key=lambda form: (-len(form), form))
    pattern = re.compile("|".join(map(re.escape, ordered)))
    search, sub = pattern.search, pattern.sub
    shortest = len(ordered[-1])
    # A needle holding another is found only where that one is: keep the shorter.
    kept = sorted(needles, key=len)
    kept = [needle for i, needle in enumerate(kept) if not any(n in needle for n in kept[:i])]
    checks = tuple(kept)

    def shows(text: str) -> bool:
        if len(text) < shortest:
            return False
        for needle in checks:
            if needle in text:
                return search(text) is not None
        return False

    def mask(text: str) -> str:
        return sub(MASK, text) if shows(text) else text

    return mask, shows
