"""Hostile: a real service leaks two secrets every way it can; no encoding of them comes out.

``secret_leaker.py`` runs through ``mikros-trio run --verbose`` with spans
on the console exporter; the test reads everything the process wrote
(stdout, stderr, every response body), decodes each JSON line, and looks
for every encoding :func:`helpers.leak_forms` lists of both secrets and of
the DSN's password.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from pathlib import Path

import httpx

from helpers import Spawn, leaked_forms, run_http_service

HERE = Path(__file__).parent

#: Characters every encoder escapes somehow: quotes, a backslash, non-ASCII
#: (two- and three-byte UTF-8), a space, URL delimiters, HTML-significant ones.
TOKEN = "s3cr\"t'\\pä€ss w/+&<:@%9"
#: A database password, percent-encoded inside the DSN as a URL requires.
PASSWORD = 'dbp@ss:w"rd/é%1 x'
DSN = f"postgresql://app:{urllib.parse.quote(PASSWORD, safe='')}@db.internal:5432/items"

#: Each route and the status it answers: the leaks happen while it runs.
ROUTES = {
    "/log": 200,
    "/raise": 500,
    "/to-thread": 500,
    "/missing": 404,
    "/abort": 403,
    "/thread": 200,
    "/warn": 200,
    "/unraisable": 200,
    "/span": 200,
    f"/echo/{urllib.parse.quote(TOKEN, safe='')}?"
    + urllib.parse.urlencode({"token": TOKEN, "dsn": DSN}): 200,
    "/stop": 200,
}


def json_lines(text: str) -> list[dict[str, object]]:
    """The lines of ``text`` that are JSON objects, decoded."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_no_encoding_of_a_secret_leaves_the_process(spawn: Spawn, tmp_path: Path) -> None:
    """Logs, errors, threads, warnings, spans and the verbose log show no encoding of a secret."""
    child, port = run_http_service(
        spawn,
        HERE / "secret_leaker.py",
        tmp_path / "service.toml",
        'name = "leaker"\ntypes = ["http", "worker"]\nversion = "v1.0.0"\n'
        'envs = ["TOKEN", "DB_DSN"]\n'
        '[features.env]\nsecrets = ["TOKEN", "DB_DSN"]\n'
        '[features.tracing]\nenabled = true\nexporter = "console"\n',
        {"TOKEN": TOKEN, "DB_DSN": DSN},
    )
    bodies = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0, trust_env=False) as http:
        for route, status in ROUTES.items():
            response = http.get(route)
            assert response.status_code == status, (route, response.text)
            bodies.append(response.text)
    assert child.wait() == 0, child.report()

    everything = "\n".join([child.stdout, child.stderr, *bodies])
    leaks = [f"TOKEN {name}" for name in leaked_forms(TOKEN, everything)]
    leaks += [f"DB_DSN {name}" for name in leaked_forms(DSN, everything)]
    if base64.b64encode(f"app:{TOKEN}".encode()).decode() in everything:
        leaks.append("Basic credentials")
    assert not leaks, f"{leaks}\n{child.report()}\n{bodies}"

    # Every leak was written, masked, not dropped or printed raw elsewhere.
    lines = json_lines(child.stdout)
    events = [str(line.get("event", "")) for line in lines]
    assert any(event.startswith("repr '***' ascii '***'") for event in events), events
    assert any("thread" in event and "leaky-thread" in event for event in events), events
    assert any("expires soon" in event for event in events), events
    assert any("finaliser holding" in json.dumps(line) for line in lines), events
    assert any("could not be written" in event for event in events), events
    spans = json_lines(child.stderr)
    names = {str(span.get("name")) for span in spans}
    assert "child ***" in names, names
    assert "grandchild" in names, names
