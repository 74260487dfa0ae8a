"""schemathesis hooks for tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

Valid requests really generate text on the real model; a generated ``max_tokens`` of
thousands would make each such case take minutes on a CPU. Integer limits above
MAX_TOKENS are lowered to it before the call, so every case runs, and runs fast.
Everything else -- types, ranges, negative and absent values -- reaches the server as
generated. (Large limits are covered by tests/test_hardening.py.)"""

import schemathesis

MAX_TOKENS = 4


@schemathesis.hook
def before_call(context, case, kwargs):
    body = case.body
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if type(value) is int and value > MAX_TOKENS:
                body[key] = MAX_TOKENS
