"""POST /v1/completions: a prompt already in the chat format, images beside it.

The prompt is text in Phi-3-vision's chat format with `<|image_N|>` tags (as `LLM.generate` takes it, e.g.
"<|user|>\\n<|image_1|>\\nWhat is this?<|end|>\\n<|assistant|>\\n"). The images are an extra field, as vLLM
takes multimodal data beside a prompt: `images` (a list of sources, image N = the N-th), or vLLM's own shape
`multi_modal_data: {"image": source | [sources]}`. A source is what an `image_url` takes (a data: URI, an
http(s) URL when enabled, a path under --allowed-media-dir).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from phi3v.output import Completion
from phi3v.sampling_params import SamplingParams
from phi3v.server.frontend import PromptInput
from phi3v.server.logprobs import legacy_logprobs
from phi3v.server.protocol import FinishReason, SamplingRequest, Usage, _Req
from phi3v.server.serving import (check_params, check_request, parse_body, respond, sse, sse_error,
                                  submit_unless_gone, total_usage)

_Source = Annotated[str, Field(min_length=1)]


class MultiModalData(_Req):
    image: _Source | list[_Source] | None = None


class CompletionRequest(SamplingRequest):
    prompt: _Source | Annotated[list[_Source], Field(min_length=1, max_length=1)] = Field(
        description="one prompt in the chat format with <|image_N|> tags (a list of one string is accepted too)")
    images: list[_Source] | None = Field(None, description="image sources for <|image_1|>, <|image_2|>, ...")
    multi_modal_data: MultiModalData | None = Field(None, description="vLLM's shape: {\"image\": source | [...]}")
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None
    num_crops: Annotated[int, Field(ge=1, le=64, description="336px crops per image (extension)")] | None = None

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def image_sources(self) -> list[str]:
        if self.images is not None and self.multi_modal_data is not None:
            raise ValueError("give the images either as images or as multi_modal_data, not both")
        if self.multi_modal_data is not None:
            img = self.multi_modal_data.image
            return [] if img is None else [img] if isinstance(img, str) else list(img)
        return list(self.images or [])

    def sampling_params(self, context_len: int) -> SamplingParams:
        if self.suffix:
            raise ValueError("suffix is not supported (the model has no fill-in-the-middle format)")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of is not supported (other than equal to n)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported (the prompt's logprobs are not computed)")
        return self._params(self.max_tokens or 16, self.logprobs)


class _Resp(BaseModel):
    model_config = ConfigDict(extra="allow")


class CompletionChoice(_Resp):
    index: int = 0
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: FinishReason | None = None


class TextCompletion(_Resp):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


def add_completions_route(app: FastAPI, state: Any, errors: dict[int | str, Any]) -> None:
    settings = state.settings

    @app.post("/v1/completions", response_model=TextCompletion, responses=errors)
    async def completions(request: Request) -> Any:
        rid: str = request.scope["state"]["rid"]
        req = await parse_body(request, CompletionRequest)
        adapter = check_request(req, settings)
        fe = state.ready()
        params = req.sampling_params(fe.engine.max_model_len)
        params.lora = adapter
        check_params(params, fe)
        inputs = PromptInput(req.text(), req.image_sources())
        echo = inputs.prompt if req.echo else ""
        crops, streaming = req.num_crops or settings.num_crops, req.stream
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        del req
        held: list[Any] = [inputs]
        n_images = len(inputs.images)
        del inputs
        stream = await submit_unless_gone(fe, request, rid, held, params, crops, n_images)
        tok, model = fe.llm.tokenizer, settings.model_id if adapter is None else adapter

        def body(done: list[Completion]) -> TextCompletion:
            choices = [CompletionChoice(index=c.index, text=echo + c.text, finish_reason=c.finish_reason,
                                        logprobs=legacy_logprobs(tok, c.logprobs)) for c in done]
            return TextCompletion(id=rid, model=model, choices=choices, usage=Usage(**total_usage(done)))

        return await respond(request, stream, streaming, lambda: _chunks(rid, model, stream, tok, echo, include_usage),
                             body)


async def _chunks(rid: str, model: str, stream: Any, tok: Any, echo: str, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    sent = [0] * stream.n  # characters of each choice's text sent (the logprobs' text_offset)
    done: list[Completion] = []

    def chunk(i: int, text: str, finish: str | None = None, lp: dict[str, Any] | None = None) -> str:
        return sse(TextCompletion(id=rid, model=model, created=created,
                                  choices=[CompletionChoice(index=i, text=text, finish_reason=finish, logprobs=lp)]))

    try:
        if echo:
            for i in range(stream.n):
                yield chunk(i, echo)
        async for item in stream.events():
            lp = legacy_logprobs(tok, item.logprobs, sent[item.index]) if item.logprobs else None
            if item.delta or lp is not None:
                yield chunk(item.index, item.delta, lp=lp)
            sent[item.index] += sum(len(t) for t in lp["tokens"]) if lp else 0
            if item.done is not None:
                done.append(item.done)
                yield chunk(item.index, "", item.done.finish_reason)
        if include_usage:
            yield sse(TextCompletion(id=rid, model=model, created=created, choices=[],
                                     usage=Usage(**total_usage(done))))
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band
        yield sse_error(rid, e)
    yield "data: [DONE]\n\n"
