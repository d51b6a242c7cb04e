"""vLLM's side endpoints: /tokenize, /detokenize and /version (request models in runtime/tokenize_api.py)."""
from fastapi import APIRouter, Request

from semipd.runtime.api.context import ServerContext, from_body
from semipd.runtime.api.openapi import json_request
from semipd.runtime.api.prompts import encode, render_chat
from semipd.runtime.protocol import bad_request
from semipd.runtime.tokenize_api import DetokenizeRequest, TokenizeRequest

router = APIRouter()


@router.post("/tokenize", openapi_extra=json_request(TokenizeRequest))
async def tokenize(request: Request):
    return await from_body(request, TokenizeRequest, tokenize_body)


def tokenize_body(ctx: ServerContext, req: TokenizeRequest) -> dict:
    if req.prompt is not None:
        ids = encode(ctx.tokenizer, req.prompt, "prompt", add_special_tokens=req.special_tokens)
    else:
        text = render_chat(ctx.tokenizer, req.messages, req.add_generation_prompt, req.continue_final_message)
        ids = encode(ctx.tokenizer, text, "messages", add_special_tokens=req.special_tokens)
    strs = ctx.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": ctx.engine.max_model_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize", openapi_extra=json_request(DetokenizeRequest))
async def detokenize(request: Request):
    return await from_body(request, DetokenizeRequest, detokenize_body)


def detokenize_body(ctx: ServerContext, req: DetokenizeRequest) -> dict:
    outside = [t for t in req.tokens if not 0 <= t <= ctx.max_token_id]
    if outside:
        raise bad_request(f"tokens: token id {outside[0]} is outside the vocabulary (ids 0 to "
                          f"{ctx.max_token_id})", "tokens")
    return {"prompt": ctx.tokenizer.decode(req.tokens)}


@router.get("/version")
async def version(request: Request):
    return {"version": request.app.version}
