"""Small routes beside the generating ones: GET /v1/models/{id}, /version; POST /tokenize, /detokenize (vLLM's
request and response shapes)."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from phi3v import __version__
from phi3v.processing.chat import render_chat, tokenize_prompt
from phi3v.processing.limits import check_text
from phi3v.server.protocol import ChatMessage, ModelCard
from phi3v.server.serving import APIError


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = Field(None, description="text (the chat format's tags included); no <|image_N|> tags")
    messages: list[ChatMessage] | None = Field(None, description="or text-only chat messages, rendered as for chat")
    add_generation_prompt: bool = True  # with messages: end with the assistant's tag
    add_special_tokens: bool = True  # False: no BOS


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1 << 20)]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


def add_extra_routes(app: FastAPI, state: Any, errors: dict[int | str, Any]) -> None:
    settings = state.settings

    def check_model(model: str | None) -> None:
        if model is not None:
            settings.adapter(model)  # APIError 404 unless the base model or an adapter

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=errors)
    async def model(model_id: str) -> ModelCard:
        adapter = settings.adapter(model_id)
        return next(c for c in state.model_cards() if c.id == (adapter or settings.model_id))

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=errors)
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        check_model(req.model)
        fe = state.ready()
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt", code="invalid_value")
        ctx = fe.engine.max_model_len
        ids = await anyio.to_thread.run_sync(_tokenize, fe.llm.tokenizer, req, ctx)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=ctx)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=errors)
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        check_model(req.model)
        fe = state.ready()
        tok = fe.llm.tokenizer
        bad = [t for t in req.tokens if t >= tok.vocab_size]
        if bad:
            raise APIError(400, f"token {bad[0]} is not in the vocabulary ({tok.vocab_size} tokens)",
                           param="tokens", code="invalid_value")
        text = await anyio.to_thread.run_sync(lambda: tok.decode(req.tokens, skip_special_tokens=False))
        return DetokenizeResponse(prompt=text)


def _tokenize(tok: Any, req: TokenizeRequest, ctx: int) -> list[int]:
    """Token ids of the prompt, or of the rendered messages (text only: an image's tokens depend on the image)."""
    if req.messages is not None:
        prompt, images = render_chat([m.to_internal() for m in req.messages],
                                     add_generation_prompt=req.add_generation_prompt)
        if images:
            raise ValueError("tokenize takes text only: an image's token count depends on the image and its crops")
    else:
        prompt = req.prompt or ""
    check_text(prompt, 4 * ctx * tok.max_token_chars)
    ids = tokenize_prompt(tok, prompt, [])
    if not req.add_special_tokens and ids and ids[0] == tok.bos_token_id:
        ids = ids[1:]
    return ids
