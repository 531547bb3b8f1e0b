"""Mikros errors as the kinds send them: every string masked, at any depth, before encoding.

The HTTP body and the gRPC status message are ``json.dumps`` of what
:func:`~mikros_trio._error_wire.wire_error` returns; these tests encode it the
same way and look for every form of the secret in the result.
"""

from __future__ import annotations

import json
import urllib.parse

from helpers import leaked_forms
from mikros_trio._error_wire import ErrorPolicy, unexpected_error, wire_error
from mikros_trio._telemetry import Telemetry
from mikros_trio.errors import NotFoundError

#: Characters JSON and repr escape, and a non-ASCII one.
SECRET = "t0k\"en'\\é-4f1c"


def hub() -> Telemetry:
    """A service's hub with the secret registered."""
    telemetry = Telemetry("items")
    telemetry.add_secrets([SECRET], name="TOKEN")
    return telemetry


def test_an_error_body_masks_every_form_of_a_secret() -> None:
    """repr, JSON and URL forms in the message, details and nested attributes keys and values."""
    error = NotFoundError(
        f"no account for {SECRET!r}",
        details=urllib.parse.quote_plus(SECRET),
        attributes={"token": [json.dumps(SECRET)], SECRET: {"bytes": repr(SECRET.encode())}},
    )
    wire = wire_error(error, "items", hub())
    for ensure_ascii in (True, False):
        assert leaked_forms(SECRET, json.dumps(wire, ensure_ascii=ensure_ascii)) == []
    assert wire["message"] == "no account for '***'"
    assert wire["details"] == "***"
    assert wire["attributes"] == {"token": ['"***"'], "***": {"bytes": "b'***'"}}


def test_an_unexpected_exception_s_details_are_masked() -> None:
    """An exception quoting the secret's repr becomes an InternalError whose details are masked."""
    telemetry = hub()
    wire = wire_error(unexpected_error(KeyError(SECRET), telemetry), "items", telemetry)
    assert wire["details"] == "KeyError: '***'"
    assert leaked_forms(SECRET, json.dumps(wire)) == []


def test_without_secrets_the_body_is_the_error_s_own() -> None:
    """No secret registered: the wire object is the error's, with the service name filled."""
    wire = wire_error(NotFoundError("gone"), "items", Telemetry("items"))
    assert wire == {"code": 0, "service_name": "items", "message": "gone", "kind": "NotFoundError"}


def test_hidden_fields_go_before_masking_and_code_and_kind_stay() -> None:
    """A published policy's hidden keys never reach the body; code and kind always do."""
    telemetry = hub()
    telemetry.publish(ErrorPolicy(hidden=frozenset({"message", "details", "cause"})))
    error = NotFoundError(f"no {SECRET}", code=3, details=SECRET, destination="billing")
    wire = wire_error(error, "items", telemetry)
    assert wire == {
        "code": 3,
        "service_name": "items",
        "destination": "billing",
        "kind": "NotFoundError",
    }
