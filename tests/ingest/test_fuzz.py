"""Property-based fuzz of the webhook endpoints (hypothesis), in-process against the fake broker.

Each case is one request to the real ASGI app (``tests/ingest/fake_app.py``): endpoint (signed or
legacy, with or without the slash), org slug (known, unknown, invalid, unicode, arbitrary text),
signature or legacy token (valid with the current or previous secret, case or spacing changed,
wrong, for another body, missing), resource, timestamp, content type and encoding headers, random
extra headers (sometimes over the head limits), and the body (corpus payloads, mutated Sentry
issues, arbitrary JSON values, random bytes, invalid UTF-8, UTF-16, a BOM, huge numbers, deep
nesting, empty, over the size limit), sent whole or in chunks. Properties:

- no 5xx (the fake broker always acknowledges, so the 503 of "not durable" cannot happen);
- every non-200 answer is the JSON error shape;
- the status is the one the case calls for: 431, 413, 401, 400 or 200, in the order ingest checks;
- what the broker received: nothing for an unsigned or refused request, and for a correctly signed
  body that parses (orjson, the router's parser) exactly that body, once, byte for byte.

Derandomized (same cases every run) and at least ``EXAMPLES`` cases, counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.types import ASGIApp, Message

from ingest.http_limits import MAX_HEADERS
from shared.security import sign
from shared.settings import Settings
from tests.ingest.fake_app import LEGACY_TOKEN, LEGACY_TOKENS, SECRETS, fake_ingest
from tests.ingest.fake_kafka import Harness, drained
from tests.support.sentry import payloads_dir

EXAMPLES = 10_000
LIMIT = 64 * 1024  # max_body_bytes of the app under test
HUGE_HEADER = 20 * 1024  # one header value over the 16 KiB head limit

CORPUS = [path.read_bytes() for path in sorted(payloads_dir().glob("*.json"))]
VALID_SIGNATURES = {"current", "upper", "padded"}


@dataclass
class Case:
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunks: int
    expected: int


def _latin1(max_size: int) -> st.SearchStrategy[bytes]:
    """Header values: printable latin-1 and tab (no CR, LF or NUL: the HTTP parser refuses them)."""
    chars = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f") | st.just("\t")
    return st.text(chars, max_size=max_size).map(lambda s: s.encode("latin-1"))


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


def _weighted(*choices: tuple[int, object]) -> st.SearchStrategy[Any]:
    return st.sampled_from([value for weight, value in choices for _ in range(weight)])


# Strategies are built once: building them per case costs more than running the case.
BODY_KINDS = _weighted(
    (3, "corpus"),
    (3, "issue"),
    (3, "json"),
    (1, "bytes"),
    (1, "utf8"),
    (1, "utf16"),
    (1, "bom"),
    (1, "number"),
    (1, "deep"),
    (1, "empty"),
    (1, "oversize"),
)
CORPUS_INDEX = st.integers(0, len(CORPUS) - 1)
ISSUE = json.loads((payloads_dir() / "issue.created.json").read_bytes())
ISSUE_IDS = st.integers(-(2**70), 2**70) | st.text(max_size=30) | st.none()
SHORT_TEXT = st.text(max_size=30)
SLUGS = SHORT_TEXT | st.integers()
JSON_VALUES = _json_values()
BINARY = st.binary(max_size=2000)
SHORT_BINARY = st.binary(min_size=1, max_size=40)
UNICODE_ENCODINGS = st.sampled_from(["utf-16", "utf-16-le", "utf-32"])
DIGITS = st.integers(1, 2000)
NUMBER_FORMS = st.sampled_from([b'{"n":%s}', b'{"n":-%s.5e3}', b"%s", b'{"n":1e%s}'])
DEPTHS = st.integers(1, 5000)
NESTINGS = st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")])
OVERSIZE = st.integers(LIMIT - 10, LIMIT + 100)

ORGS = ["acme", "beta", "ghost", "ACME", "acme ", "123", "a" * 101, "ünïcödé", "a.b", "-", "acme\u200b"]
# One path segment, as Sentry builds the URL (a "/" would make another route, or none).
ANY_ORG = st.text(min_size=1, max_size=16).filter(lambda s: "/" not in s)
ORG = _weighted((6, "acme"), (2, "listed"), (1, "text"))
LISTED_ORG = st.sampled_from(ORGS)
TOKENS = _weighted((3, "right"), (1, "wrong"), (1, "text"))
ANY_TOKEN = st.text(min_size=1, max_size=16).filter(lambda s: "/" not in s)
SIGNATURES = _weighted(
    (4, "current"),
    (1, "previous"),
    (1, "upper"),
    (1, "padded"),
    (1, "missing"),
    (1, "empty"),
    (1, "wrong_secret"),
    (1, "other_body"),
    (1, "random"),
    (1, "truncated"),
)
RESOURCE = st.sampled_from(
    ["issue", "error", "event_alert", "metric_alert", "comment", "installation", "seer", "ISSUE", " issue ", None]
) | st.text(max_size=20)
HEAD = _weighted((18, "normal"), (1, "many"), (1, "huge"))
DECLARED = _weighted((19, "length"), (1, "over_limit"))  # Content-Length: the body's, or one over the limit
OPTIONAL_HEADERS = (
    (b"sentry-hook-signature", _latin1(70)),  # drawn only for a "random" signature
    (b"sentry-hook-timestamp", st.none() | st.just(str(int(time.time())).encode()) | _latin1(12)),
    (
        b"content-type",
        st.sampled_from([None, b"application/json", b"application/json; charset=latin-1", b"text/plain"]) | _latin1(12),
    ),
    (b"content-encoding", st.sampled_from([None, b"gzip", b"identity", b"br"])),
    (b"request-id", st.none() | _latin1(12)),
)
EXTRA_HEADERS = st.lists(
    st.tuples(
        st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).map(lambda s: b"x-" + s.encode()),
        _latin1(12),
    ),
    max_size=3,
)
CHUNKS = st.sampled_from([1, 1, 1, 2, 7])


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(BODY_KINDS)
    corpus = CORPUS[draw(CORPUS_INDEX)]
    if kind == "corpus":
        return corpus
    if kind == "issue":  # a Sentry issue webhook with odd ids, slugs and actions
        body = copy.deepcopy(ISSUE)
        body["action"] = draw(SHORT_TEXT)
        body["data"]["issue"]["id"] = draw(ISSUE_IDS)
        body["data"]["issue"]["project"]["slug"] = draw(SLUGS)
        return json.dumps(body, ensure_ascii=draw(st.booleans())).encode()
    if kind == "json":
        return json.dumps(draw(JSON_VALUES), ensure_ascii=draw(st.booleans())).encode()
    if kind == "bytes":
        return draw(BINARY)
    if kind == "utf8":  # invalid UTF-8 inside a JSON string
        return b'{"data":{"issue":{"id":"' + draw(SHORT_BINARY) + b'\xff\xfe"}}}'
    if kind == "utf16":
        return corpus.decode().encode(draw(UNICODE_ENCODINGS))
    if kind == "bom":
        return b"\xef\xbb\xbf" + corpus
    if kind == "number":
        return draw(NUMBER_FORMS) % (b"9" * draw(DIGITS))
    if kind == "deep":
        depth = draw(DEPTHS)
        opener, closer = draw(NESTINGS)
        return opener * depth + b"1" + closer * depth
    if kind == "empty":
        return b""
    return b'{"pad":"' + b"x" * draw(OVERSIZE) + b'"}'


def _parses(body: bytes) -> bool:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True


def _pick(draw: st.DrawFn, choice: str, strategies: dict[str, st.SearchStrategy[str]]) -> str:
    return draw(strategies[choice])


@st.composite
def cases(draw: st.DrawFn) -> Case:
    legacy = draw(st.integers(0, 4)) == 0
    org = _pick(draw, draw(ORG), {"acme": st.just("acme"), "listed": LISTED_ORG, "text": ANY_ORG})
    body = draw(bodies())
    head = draw(HEAD)
    declared = draw(DECLARED)
    headers: list[tuple[bytes, bytes]] = []
    credentials_ok = False
    signature_choice = url_token = None
    if legacy:
        token = draw(TOKENS)
        url_token = _pick(draw, token, {"right": st.just(LEGACY_TOKEN), "wrong": st.just("x"), "text": ANY_TOKEN})
        credentials_ok = org in LEGACY_TOKENS and url_token == LEGACY_TOKEN
        path = f"/webhooks/sentry-legacy/{quote(org, safe='')}/{quote(url_token, safe='')}"
    else:
        path = f"/webhooks/sentry/{quote(org, safe='')}"
        signature_choice = choice = draw(SIGNATURES)
        secrets = SECRETS.get(org, ("not-a-secret-of-this-org",))
        secret = {"previous": secrets[1] if len(secrets) > 1 else "none", "wrong_secret": "wrong"}.get(
            choice, secrets[0]
        )
        signature = sign(secret, body + b"x" if choice == "other_body" else body)
        signature = {
            "upper": signature.upper(),
            "padded": f"  {signature} ",
            "truncated": signature[:-1],
            "empty": "",
        }.get(choice, signature)
        if choice not in ("missing", "random"):
            headers.append((b"sentry-hook-signature", signature.encode()))
        valid = choice in VALID_SIGNATURES or (choice == "previous" and len(secrets) > 1)
        credentials_ok = org in SECRETS and valid
        resource = draw(RESOURCE)
        if resource is not None:
            headers.append((b"sentry-hook-resource", resource.encode("utf-8", "replace")))
    path += "/" if draw(st.booleans()) else ""
    for name, value in OPTIONAL_HEADERS:
        if name == b"sentry-hook-signature" and signature_choice != "random":
            continue
        drawn = draw(value)
        if drawn is not None:
            headers.append((name, drawn))
    headers += draw(EXTRA_HEADERS)
    if head == "many":
        headers += [(b"x-filler-%d" % n, b"1") for n in range(MAX_HEADERS + 1)]
    elif head == "huge":
        headers.append((b"x-huge", b"h" * HUGE_HEADER))

    if head != "normal":
        expected = 431
    elif len(body) > LIMIT or declared == "over_limit":
        expected = 413
    elif not credentials_ok:
        expected = 401
    elif not _parses(body):
        expected = 400
    else:
        expected = 200
    chunks = draw(CHUNKS)
    if declared == "over_limit":
        headers.append((b"content-length", b"%d" % (LIMIT + 1)))
    elif chunks == 1:
        headers.append((b"content-length", b"%d" % len(body)))
    else:
        headers.append((b"transfer-encoding", b"chunked"))
    return Case(path, headers, body, chunks, expected)


async def call(app: ASGIApp, case: Case) -> tuple[int, bytes]:
    """One request straight to the ASGI app, as uvicorn hands it over: the URL's path percent-decoded,
    the body in ``case.chunks`` messages, then a disconnect."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": unquote(case.path),
        "raw_path": case.path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"ingest"), *((name.lower(), value) for name, value in case.headers)],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    step = max(1, -(-len(case.body) // case.chunks))
    parts = [case.body[start : start + step] for start in range(0, len(case.body), step)] or [b""]
    messages: list[Message] = [
        {"type": "http.request", "body": part, "more_body": n < len(parts) - 1} for n, part in enumerate(parts)
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def check(app: ASGIApp, harness: Harness, case: Case) -> None:
    log = harness.broker.log
    before = len(log)
    status, body = await call(app, case)
    assert status < 500, (status, body)
    answer = orjson.loads(body)
    if status != 200:
        error = answer["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str), body
    assert status == case.expected, (status, body)
    if status == 200 and answer["status"] == "spooled":
        await drained(harness)
    published = [value for _, _, value in log[before:]]
    assert published == ([case.body] if status == 200 else []), "published other than the one signed body"


def test_webhook_endpoints_hold_their_properties(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    stack = contextlib.AsyncExitStack()
    count = 0
    app_settings = Settings(max_body_bytes=LIMIT, spool_dir=str(tmp_path))
    app, harness = loop.run_until_complete(stack.enter_async_context(fake_ingest(tmp_path, app_settings)))
    seen: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases())
    def run(case: Case) -> None:
        nonlocal count
        count += 1
        seen[case.expected] = seen.get(case.expected, 0) + 1
        loop.run_until_complete(check(app, harness, case))

    started = time.monotonic()
    try:
        run()
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()
    print(f"fuzz: {count} cases in {time.monotonic() - started:.1f} s, by expected status {sorted(seen.items())}")
    assert count >= EXAMPLES
    assert all(seen.get(status, 0) >= count // 100 for status in (200, 400, 401, 413, 431)), seen
