"""Pydantic's validation errors -> one OpenAI-style message (what the 400 body says, and which param)."""

from __future__ import annotations

from typing import Any

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _clean_loc(loc: Any) -> list[str]:
    """Field path without 'body' and pydantic's union-branch labels ('str', 'list[...]', 'constrained-str')."""
    out: list[str] = []
    for x in loc:
        if x == "body" or (isinstance(x, str) and (x in _TYPE_TAGS or "[" in x or "-" in x)):
            continue
        if out and out[-1] == str(x):  # a tagged-union label followed by the field of the same name
            continue
        out.append(str(x))
    return out


def validation_message(errs: list[Any]) -> tuple[str, str | None, str | None]:
    """(message, param, code) from pydantic errors: the deepest problem, union alternatives joined."""
    if not errs:
        return "invalid request", None, None
    if errs[0].get("type") == "json_invalid":
        why = errs[0].get("ctx", {}).get("error", "parse error")
        return f"the request body is not valid JSON ({why})", None, "json_invalid"
    depth = max(len(_clean_loc(e.get("loc", ()))) for e in errs)
    group = [e for e in errs if len(_clean_loc(e.get("loc", ()))) == depth]
    loc = _clean_loc(group[0].get("loc", ()))
    param = ".".join(loc) or None
    msgs = list(dict.fromkeys(str(e.get("msg", "invalid value")) for e in group
                              if _clean_loc(e.get("loc", ())) == loc))[:3]
    if param is None and group[0].get("type") == "missing":
        return "the request body is missing: send a JSON object with 'model' and 'messages'", None, "missing"
    msg = f"{param or 'request body'}: {' or '.join(msgs)}"
    rest = len(errs) - len(group)
    if rest > 0:
        msg += f" (and {rest} more problem{'s' if rest > 1 else ''})"
    return msg, param, group[0].get("type")
