"""Request and response schemas of the OpenAI-compatible server (pydantic v2).

Shapes follow OpenAI's `chat.completions`: requests are validated strictly (a string where a number
belongs is a 400, not a silent coercion). Fields that OpenAI clients send routinely but that change nothing
here (`user`, `store`, `metadata`, `service_tier`) are declared and accepted; any other unknown top-level field
is a 400 naming it (`unknown_fields`). Extensions: `num_crops`, `top_k`, `repetition_penalty`, `ignore_eos`.
The completions request (`/v1/completions`) is in completions.py, tool calling in tools.py.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from phi3v.processing.video import DEFAULT_FRAMES, MAX_FRAMES
from phi3v.sampling_params import SamplingParams
from phi3v.server.tools import (Tool, ToolCall, ToolChoice, ToolPlan, plan, render_calls, render_result,
                                with_tools_prompt)

_REQ = ConfigDict(strict=True, extra="allow")


class _Req(BaseModel):
    model_config = _REQ


# ---------------------------------------------------------------- requests


class ImageURL(_Req):
    url: Annotated[str, Field(min_length=1, description="data:image/...;base64,..., http(s):// (when enabled) "
                                                        "or a path / file:// URI under --allowed-media-dir")]
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="low: one 336px crop per image; high/auto: the server's default number of crops")


class TextPart(_Req):
    type: Literal["text"]
    text: str


class ImagePart(_Req):
    type: Literal["image_url"]
    image_url: ImageURL | Annotated[str, Field(min_length=1)]  # {"url": ...} or the URL itself

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url

    @property
    def detail(self) -> str | None:
        return None if isinstance(self.image_url, str) else self.image_url.detail


class VideoURL(_Req):
    url: Annotated[str, Field(min_length=1, description="data:video/...;base64,..., http(s):// (when enabled) "
                                                        "or a path / file:// URI under --allowed-media-dir")]
    num_frames: Annotated[int, Field(ge=1, le=MAX_FRAMES, description="frames sampled evenly, each sent as an image "
                                                                 "(extension; default 8)")] | None = None


class VideoPart(_Req):
    """vLLM's video part: its frames are sampled evenly and become images (phi3v/processing/video.py)."""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool

    def to_internal(self, call_names: dict[str, str] | None = None) -> dict[str, Any]:
        """The message as `phi3v.processing.chat.render_chat` takes it (developer -> system; tool -> a user turn
        naming the call it answers, assistant tool_calls -> JSON in its turn: tools.py). call_names: tool call id
        -> function name, from the earlier assistant messages."""
        role = "system" if self.role == "developer" else self.role
        if role == "tool" or (self.tool_calls and role == "assistant"):
            if isinstance(self.content, list) and any(not isinstance(p, TextPart) for p in self.content):
                raise ValueError(f"a {'tool' if role == 'tool' else 'tool-calling assistant'} message may hold "
                                 "text only (no images or videos)")
        if role == "tool":
            text = self.content if isinstance(self.content, str) else "\n".join(
                p.text for p in self.content or [] if isinstance(p, TextPart))
            name = (call_names or {}).get(self.tool_call_id or "") or self.name
            return {"role": "user", "content": render_result(self.tool_call_id, name, text)}
        if self.tool_calls and role == "assistant":
            calls = render_calls(self.tool_calls)
            text = self.content if isinstance(self.content, str) else "\n".join(
                p.text for p in self.content or [] if isinstance(p, TextPart))
            return {"role": role, "content": f"{text}\n{calls}" if text else calls}
        if self.content is None:
            return {"role": role, "content": ""}
        if isinstance(self.content, str):
            return {"role": role, "content": self.content}
        parts: list[dict[str, Any]] = []
        for p in self.content:
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
            elif isinstance(p, VideoPart):
                parts.append({"type": "video_url", "video_url": {"url": p.video_url.url},
                              "num_frames": p.video_url.num_frames or DEFAULT_FRAMES})
            else:
                parts.append({"type": "image_url", "image_url": {"url": p.url}})
        return {"role": role, "content": parts}


class StreamOptions(_Req):
    include_usage: bool = False


class JSONSchemaFormat(_Req):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Req):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


_Stop = Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)]


class SamplingRequest(_Req):
    """The sampling fields that chat and text completions share, and the accepted no-op fields."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: _Stop | None = None
    n: Annotated[int, Field(ge=1, le=128, description="choices (at most the server's --max-num-seqs)")] | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="token id (as a string key) -> bias added to its logit")
    # accepted, changing nothing here
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    # extensions
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    ignore_eos: bool | None = False

    def unknown_fields(self) -> list[str]:
        """Top-level fields this server does not know (the route answers 400 naming them)."""
        return sorted(self.model_extra or {})

    def _bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        out = {}
        for k, v in self.logit_bias.items():
            if not (k.strip().isascii() and k.strip().isdigit()):  # isdigit alone takes '²' and '٣'
                raise ValueError(f"logit_bias keys must be token ids (integers as strings), got {k!r}")
            out[int(k)] = v
        return out

    def _params(self, max_tokens: int, logprobs: int | None, schema: dict[str, Any] | None = None,
                json_object: bool = False) -> SamplingParams:
        try:
            return SamplingParams(
                json_schema=schema, json_object=json_object, max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, seed=self.seed,
                repetition_penalty=self.repetition_penalty or 1.0, stop=self.stop, ignore_eos=bool(self.ignore_eos),
                logprobs=logprobs, presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0, logit_bias=self._bias(), n=self.n or 1)
        except ImportError as e:
            raise ValueError(f"structured output is not available on this server ({e.name} is not installed)") from None


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted: a choice holds at most one call
    # extensions
    num_crops: Annotated[int, Field(ge=1, le=64, description="336px crops per image (extension)")] | None = None

    def crops(self, default: int | None) -> int | None:
        """`num_crops` if given; otherwise 1 when every image asked for detail=low, else `default`."""
        if self.num_crops is not None:
            return self.num_crops
        details = [p.detail for m in self.messages if isinstance(m.content, list)
                   for p in m.content if isinstance(p, ImagePart)]
        if details and all(d == "low" for d in details):
            return 1
        return default

    def num_images(self) -> int:
        """Images of the request, each video counting its frames."""
        return sum(1 if isinstance(p, ImagePart) else (p.video_url.num_frames or DEFAULT_FRAMES)
                   for m in self.messages if isinstance(m.content, list)
                   for p in m.content if isinstance(p, (ImagePart, VideoPart)))

    def tool_plan(self) -> ToolPlan | None:
        """How the answer is constrained to a tool call (None: plain text). ValueError -> 400."""
        tp = plan(self.tools, self.tool_choice)
        if tp is not None and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format and a tool_choice that forces a call cannot be combined")
        return tp

    def internal_messages(self, tp: ToolPlan | None) -> list[dict[str, Any]]:
        """The messages as render_chat takes them, with the tools' description when a call is forced."""
        names = {c.id: c.function.name for m in self.messages for c in (m.tool_calls or [])}
        out = [m.to_internal(names) for m in self.messages]
        return with_tools_prompt(out, tp) if tp is not None else out

    def sampling_params(self, context_len: int, tp: ToolPlan | None = None) -> SamplingParams:
        """The engine's sampling parameters (ValueError -> 400). max_tokens defaults to the context."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        fmt, schema = self.response_format, None
        if fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise ValueError("response_format json_schema needs json_schema.schema")
            schema = fmt.json_schema.schema_
        if tp is not None:
            schema = tp.schema
        return self._params(self.max_completion_tokens or self.max_tokens or context_len,
                            (self.top_logprobs or 0) if self.logprobs else None, schema,
                            fmt is not None and fmt.type == "json_object" and tp is None)


# ---------------------------------------------------------------- responses


class _Resp(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptTokensDetails(_Resp):
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


class Usage(_Resp):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(_Resp):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(_Resp):
    content: list[TokenLogprob] | None = None


FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class AssistantMessage(_Resp):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class Choice(_Resp):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(_Resp):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaToolCall(ToolCall):
    index: int = 0


class DeltaMessage(_Resp):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(_Resp):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Resp):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(_Resp):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "phi3v"
    root: str | None = None  # the checkpoint, or a LoRA adapter's folder
    parent: str | None = None  # a LoRA adapter: the base model's id (as vLLM lists adapters)
    max_model_len: int | None = None


class ModelList(_Resp):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(_Resp):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Resp):
    error: ErrorDetail


class Health(_Resp):
    status: Literal["ok", "loading", "error"]
    detail: str | None = None


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()
