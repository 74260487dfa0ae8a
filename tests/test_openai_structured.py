"""Structured output over HTTP with the official client on the default model: json_schema
replies validate against their schema (10 prompts, strict and not, streamed too),
json_object replies parse, and what a grammar cannot enforce is a 400 naming it."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import jsonschema
import openai
import pytest

from conftest import MODEL_ID
from kv3d_core.api.structured import GrammarBuilder, SchemaError, schema_rule, translate_pattern

# bounded strings, arrays and numbers: even a 135M model that repeats itself ends within
# max_tokens (at most ~200 tokens of one character each)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 1, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "email": {"anyOf": [{"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.com$"}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3},
        "status": {"enum": ["active", "retired"]},
    },
    "required": ["name", "age", "city", "email", "tags", "status"],
    "additionalProperties": False,
    "$defs": {"tag": {"type": "string", "maxLength": 12}},
}
PROMPTS = [
    "Describe a person named Alice who lives in Paris.",
    "Tell me about Bob, a retired teacher from Lyon.",
    "Create a profile for a young programmer.",
    "Who is Carol? She is 42 and lives in Berlin.",
    "Make up a character for a fantasy novel.",
    "Give me the details of a customer called Dan.",
    "Write a short bio of a football player.",
    "Invent a person who likes cats and tea.",
    "Describe your best friend.",
    "Summarize this: Eve, 30, Madrid, loves hiking.",
]


@pytest.fixture()
def client(server):
    # replies of ~80 grammar-constrained tokens, ten at once, on a shared 2-core machine
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=900)


def _ask(client, prompt: str, strict: bool | None, **kw):
    spec = {"name": "person", "schema": PERSON}
    if strict is not None:
        spec["strict"] = strict
    return client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=300, temperature=0, response_format={"type": "json_schema",
                                                                                           "json_schema": spec}, **kw)


def test_json_schema_replies_validate(client):
    """Ten different prompts, at once (the server batches them); half with strict: true."""
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(lambda ip: _ask(client, ip[1], strict=ip[0] % 2 == 0 or None), enumerate(PROMPTS)))
    texts = set()
    for r in replies:
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        data = json.loads(choice.message.content)
        jsonschema.validate(data, PERSON)
        texts.add(choice.message.content)
    assert len(texts) > 5, "different prompts, different replies"


def test_json_schema_streamed(client):
    stream = _ask(client, PROMPTS[0], strict=True, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_parses(client):
    for prompt in ("Return a JSON object with your favourite colour.",
                   "Output JSON with the keys name and age for a person called Tom."):
        r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=200, temperature=0, response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    # and without a response format the same prompt is free text, not JSON
    free = client.chat.completions.create(model=MODEL_ID, max_tokens=40, temperature=0,
                                          messages=[{"role": "user", "content": "Describe a car as a JSON object."}])
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.choices[0].message.content)


def test_text_format_is_free_text(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Say hello."}],
                                       max_tokens=8, temperature=0, response_format={"type": "text"})
    assert r.choices[0].message.content


UNSUPPORTED = [
    ("minimum of a number", {"type": "object", "properties": {"n": {"type": "number", "minimum": 1}}},
     "properties.n.minimum"),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, "multipleOf"),
    ("empty integer range", {"type": "integer", "minimum": 5, "exclusiveMaximum": 5}, ""),
    ("unknown type", {"type": "object", "properties": {"n": {"type": "strng"}}}, "properties.n.type"),
    ("unknown keyword", {"type": "object", "nullable": True}, "nullable"),
    ("not", {"not": {"type": "string"}}, "not"),
    ("uniqueItems", {"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
    ("format email", {"type": "string", "format": "email"}, "format"),
    ("lookahead pattern", {"type": "string", "pattern": "^(?=a)a$"}, "pattern"),
    ("remote $ref", {"$ref": "https://example.com/schema.json"}, "$ref"),
    ("required without schema", {"type": "object", "properties": {}, "required": ["x"]}, "required"),
    ("false schema", {"type": "object", "properties": {"x": False}}, "properties.x"),
]


@pytest.mark.parametrize("name,schema,where", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_schema_is_400_naming_it(server, name, schema, where):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == ("response_format.json_schema.schema." + where).rstrip("."), err
    assert where.split(".")[-1] in err["message"]


BAD_FORMATS = [
    ("unknown type", {"type": "sound"}),
    ("json_schema missing", {"type": "json_schema"}),
    ("json_schema with another type", {"type": "json_object", "json_schema": {"name": "x"}}),
    ("schema name", {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}),
    ("unknown field", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "streict": True}}),
    ("strict not bool", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}),
    ("not an object", "json"),
]


@pytest.mark.parametrize("name,fmt", BAD_FORMATS, ids=[b[0] for b in BAD_FORMATS])
def test_bad_response_format_is_400(server, name, fmt):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "response_format": fmt}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("response_format")


def test_schema_checks_and_pattern_translation():
    """What the converter would silently drop is refused; patterns become the converter's dialect."""
    assert translate_pattern("\\d{3}-[a-z]+", "p") == "^[0-9]{3}-[a-z]+$"
    assert translate_pattern("^(?:ab)+?\\.x$", "p") == "^(ab)+[.]x$"
    for bad in ("a\\bc", "(?<n>x)", "a\\1", "x\"y", "[^a]\\"):
        with pytest.raises(SchemaError):
            translate_pattern(bad, "p")
    b = GrammarBuilder()
    with pytest.raises(SchemaError) as e:
        schema_rule(b, {"type": "object", "properties": {"a": {"type": "string", "pattern": "x", "maxLength": 3}}},
                    "answer", "root")
    assert e.value.path == "root.properties.a.pattern"
    # integer bounds are written out digit by digit (no leading zeros, no -0)
    from kv3d_core.api.structured import _gbnf, _int_range
    import re
    for lo, hi in ((1, 120), (-50, 7), (None, -12), (13, None), (0, 0)):
        rx = re.compile(re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), _gbnf(_int_range(lo, hi))).replace(" ", ""))
        for v in range(-200, 201):
            assert bool(rx.fullmatch(str(v))) == ((lo is None or v >= lo) and (hi is None or v <= hi)), (lo, hi, v)
        assert not rx.fullmatch("-0") and not rx.fullmatch("007")
    # a type list keeps each branch's keywords
    grammar = b.grammar(schema_rule(b, {"type": ["string", "null"], "maxLength": 2}, "answer2", "root"))
    assert "null" in grammar and "answer2" in grammar
