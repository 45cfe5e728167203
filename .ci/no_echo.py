"""Schemathesis check: an error response never repeats what the caller sent.

Every string value of eight or more characters in the request body, path and headers is looked for
in the body of any 4xx or 5xx response (cardvault's error messages are fixed text).
"""

import schemathesis


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        # Values only: field names legitimately appear in error codes (`invalid_number`).
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@schemathesis.check
def no_echo(ctx, response, case):
    if response.status_code < 400:
        return None
    sent = list(_strings(case.body)) if case.body is not None else []
    for part in (case.path_parameters, case.headers, case.query):
        if part:
            sent.extend(_strings(dict(part)))
    text = response.text
    for value in sent:
        if len(value) >= 8 and value in text:
            raise AssertionError(f"error response {response.status_code} repeats submitted input")
    return None
