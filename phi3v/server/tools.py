"""Tool calling for a model without a tool-call format of its own (docs/server.md, "Tool calling").

Phi-3-vision was not trained on a function-calling format, so a call can only be made faithfully by
constraining the answer to JSON with the structured-output grammar:

- `tool_choice` = {"type": "function", "function": {"name": F}}: the answer is F's arguments, constrained to
  F's `parameters` schema; it comes back as one tool call of F.
- `tool_choice` = "required": the answer is {"name": ..., "arguments": ...} constrained to a schema that is an
  anyOf over the tools (each: name = that tool's name as a const, arguments = its parameters schema).
- "auto" (the default when tools are given) and "none": the answer is plain text; the tools are not put into
  the prompt. Guessing whether free text "is" a call would give clients calls that may not parse.

For the constrained choices the tools (name, description, parameters) and the expected answer's shape go into
the system message. In the conversation, an assistant message's tool_calls are rendered into its turn as the
same {"name", "arguments"} JSON, and a `tool` message becomes a user turn that names the call it answers.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

_REQ = ConfigDict(strict=True, extra="allow")
_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class _Req(BaseModel):
    model_config = _REQ


class FunctionDef(_Req):
    name: Annotated[str, Field(pattern=_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Req):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Req):
    name: Annotated[str, Field(pattern=_NAME)]


class NamedToolChoice(_Req):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class ToolCallFunction(_Req):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Req):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


@dataclass
class ToolPlan:
    """A request whose answer must be a tool call: the grammar's schema and how to read the answer back."""

    schema: dict[str, Any]
    named: str | None  # the function named by tool_choice (the answer is its arguments), or None ("required")
    system_text: str


def plan(tools: list[Tool] | None, choice: ToolChoice | None) -> ToolPlan | None:
    """None when the answer is plain text (no tools, "none", "auto"). Raises ValueError (400) on a choice that
    names no given tool, or tool_choice without tools."""
    if not tools:
        if choice is not None and choice != "none":
            raise ValueError("tool_choice needs tools")
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError("tools: two tools have the same name")
    if choice is None or choice in ("auto", "none"):
        return None
    listing = "\n".join(_describe(t.function) for t in tools)
    head = f"You can call these functions (each one's arguments follow their JSON schema):\n{listing}\n"
    if isinstance(choice, NamedToolChoice):
        fn = next((t.function for t in tools if t.function.name == choice.function.name), None)
        if fn is None:
            raise ValueError(f"tool_choice names the function {choice.function.name!r}, which is not in tools "
                             f"({', '.join(names)})")
        return ToolPlan(fn.parameters or EMPTY_PARAMETERS, fn.name,
                        head + f"Call {fn.name}: answer with its arguments only, as one JSON object.")
    branches = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                  "arguments": t.function.parameters or EMPTY_PARAMETERS},
                 "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = branches[0] if len(branches) == 1 else {"anyOf": branches}
    return ToolPlan(schema, None, head + 'Call one of them: answer with one JSON object '
                                         '{"name": <the function\'s name>, "arguments": <its arguments>}.')


def _describe(fn: FunctionDef) -> str:
    desc = f": {fn.description}" if fn.description else ""
    params = json.dumps(fn.parameters or EMPTY_PARAMETERS, ensure_ascii=False)
    return f"- {fn.name}{desc}\n  arguments: {params}"


def with_tools_prompt(messages: list[dict[str, Any]], tp: ToolPlan) -> list[dict[str, Any]]:
    """The internal messages with the tools' description in the system message (prepended when there is none)."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        content = first["content"]
        if isinstance(content, str):
            content = (content + "\n\n" if content else "") + tp.system_text
        else:
            content = [*content, {"type": "text", "text": tp.system_text}]
        return [{"role": "system", "content": content}, *messages[1:]]
    return [{"role": "system", "content": tp.system_text}, *messages]


def render_calls(calls: list[ToolCall]) -> str:
    """An assistant message's tool calls as the text of its turn: one {"name", "arguments"} JSON per line."""
    lines = []
    for c in calls:
        try:
            args: Any = json.loads(c.function.arguments)
        except json.JSONDecodeError:
            args = c.function.arguments
        lines.append(json.dumps({"name": c.function.name, "arguments": args}, ensure_ascii=False))
    return "\n".join(lines)


def render_result(call_id: str | None, name: str | None, text: str) -> str:
    """A `tool` message's content as the text of a user turn."""
    what = f"the function call {call_id}" if call_id else "a function call"
    if name:
        what += f" ({name})"
    return f"Result of {what}:\n{text}"


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def read_call(tp: ToolPlan, text: str) -> tuple[str, str] | None:
    """(function name, arguments as JSON text) from a constrained answer; None if it is not complete JSON (the
    answer ran out of tokens)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if tp.named is not None:
        return tp.named, text
    if not isinstance(obj, dict) or "name" not in obj or "arguments" not in obj:
        return None
    return str(obj["name"]), json.dumps(obj["arguments"], ensure_ascii=False)
