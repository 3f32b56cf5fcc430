"""POST /v1/chat/completions: n choices, tool calls (tools.py), logprobs streamed with their tokens."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request

from phi3v.output import Completion
from phi3v.server.logprobs import choice_logprobs
from phi3v.server.protocol import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
                                   ChoiceLogprobs, ChunkChoice, DeltaMessage, DeltaToolCall, Usage)
from phi3v.server.serving import (check_params, check_request, parse_body, respond, sse, sse_error,
                                  submit_unless_gone, total_usage)
from phi3v.server.tools import ToolCall, ToolCallFunction, ToolPlan, new_call_id, read_call


def answer(done: Completion, tp: ToolPlan | None) -> tuple[AssistantMessage, str | None]:
    """A finished choice as the assistant's message and its finish_reason: a tool call when the request forced
    one and the constrained JSON is complete; the text otherwise (e.g. "length": the JSON was cut short)."""
    if tp is not None and done.finish_reason == "stop":
        call = read_call(tp, done.text)
        if call is not None:
            tc = ToolCall(id=new_call_id(), function=ToolCallFunction(name=call[0], arguments=call[1]))
            return AssistantMessage(content=None, tool_calls=[tc]), "tool_calls"
    return AssistantMessage(content=done.text), done.finish_reason


def add_chat_route(app: FastAPI, state: Any, errors: dict[int | str, Any]) -> None:
    settings = state.settings

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=errors)
    async def chat_completions(request: Request) -> Any:
        rid: str = request.scope["state"]["rid"]
        req = await parse_body(request, ChatCompletionRequest)
        adapter = check_request(req, settings)
        fe = state.ready()
        tp = req.tool_plan()
        params = req.sampling_params(fe.engine.max_model_len, tp)
        params.lora = adapter
        check_params(params, fe)
        messages = req.internal_messages(tp)
        crops, n_images, streaming = req.crops(settings.num_crops), req.num_images(), req.stream
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        del req  # the parsed body (its base64 images) is not kept while the request waits or runs
        held = [messages]
        del messages
        stream = await submit_unless_gone(fe, request, rid, held, params, crops, n_images)
        tok, model = fe.llm.tokenizer, settings.model_id if adapter is None else adapter

        def body(done: list[Completion]) -> ChatCompletion:
            choices = []
            for c in done:
                msg, finish = answer(c, tp)
                choices.append(Choice(index=c.index, message=msg, finish_reason=finish,
                                      logprobs=choice_logprobs(tok, c.logprobs)))
            return ChatCompletion(id=rid, model=model, usage=Usage(**total_usage(done)), choices=choices)

        return await respond(request, stream, streaming, lambda: _chunks(rid, model, stream, tp, tok, include_usage),
                             body)


async def _chunks(rid: str, model: str, stream: Any, tp: ToolPlan | None, tok: Any,
                  include_usage: bool) -> AsyncIterator[str]:
    """The SSE events: a role chunk per choice, then text deltas (with their tokens' logprobs), a tool call in one
    delta once its JSON is complete, a finish chunk per choice, the usage chunk if asked, [DONE]."""
    created = int(time.time())

    def chunk(i: int, delta: DeltaMessage, finish: str | None = None, lp: ChoiceLogprobs | None = None) -> str:
        return sse(ChatCompletionChunk(id=rid, model=model, created=created,
                                       choices=[ChunkChoice(index=i, delta=delta, finish_reason=finish, logprobs=lp)]))

    done: list[Completion] = []
    try:
        for i in range(stream.n):
            yield chunk(i, DeltaMessage(role="assistant", content=""))
        async for item in stream.events():
            lp = choice_logprobs(tok, item.logprobs) if item.logprobs else None
            text = item.delta if tp is None else ""  # a forced tool call is sent whole, once it is complete
            if text or lp is not None:
                yield chunk(item.index, DeltaMessage(content=text), lp=lp)
            if item.done is None:
                continue
            done.append(item.done)
            msg, finish = answer(item.done, tp)
            if tp is not None:
                calls = [DeltaToolCall(index=0, **c.model_dump()) for c in msg.tool_calls or []]
                yield chunk(item.index, DeltaMessage(tool_calls=calls) if calls else DeltaMessage(content=msg.content))
            yield chunk(item.index, DeltaMessage(), finish)
        if include_usage:
            yield sse(ChatCompletionChunk(id=rid, model=model, created=created, choices=[],
                                          usage=Usage(**total_usage(done))))
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band
        yield sse_error(rid, e)
    yield "data: [DONE]\n\n"
