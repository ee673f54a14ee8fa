"""Hooks that give SGLang's `/v1/chat/completions` and `/v1/completions` the `think_merge` field
(and `parathink`, which runs the same way: `sgl_merge.serving.parathink`).

Narrow hooks: `handle_request` (AROUND OpenAIServingBase.handle_request) validates the field,
marks the HTTP request as a think_merge call and adds the call's results to the response;
`handle_streaming_request` starts a marked call's stream at once (with progress) instead of after
its first answer chunk; `generate_request` (AROUND TokenizerManager.generate_request) runs the
ThinkMerge flow in place of the route's one generation for a marked request. A request without
the field never gets past the first check, so both routes stay SGLang's own, byte for byte.

The response gains `choices[i].message.reasoning_content` (chat: the merged traces, each under a
header) and an `sgl_merge` extension object (k, mode, per-trace outcomes and thinking lengths,
answer length, per-branch agreement, the traces). A streamed response gets, before the answer,
progress chunks with empty `choices` and an `sgl_merge` object, then one chunk whose delta carries
the `reasoning_content`; the last chunk before `[DONE]` carries the final `sgl_merge` object.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from sgl_merge.contract.think import FIELDS, PARATHINK, THINK_MERGE as FIELD, ThinkMergeError, parse
from sgl_merge.envs import seconds
from sgl_merge.serving.parathink import path_layout, summarize
from sgl_merge.serving.routing import check_routing_key
from sgl_merge.serving.think_merge import ThinkMergeCall, merged_answer, run, think_token_ids

EXTENSION = "sgl_merge"
# A stream that has sent nothing for this long gets a progress chunk: thinking can take minutes
# before the first trace finishes, longer than proxies keep a silent connection open.
HEARTBEAT_ENV = "SGLANG_MERGE_STREAM_HEARTBEAT"
_max_group: list[int] = []  # the server's largest merge group, read once from the scheduler


async def handle_request(original, serving, request, raw_request):
    """AROUND OpenAIServingBase.handle_request."""
    try:
        field, entry = await _think_merge_entry(serving, raw_request)
    except ThinkMergeError as e:
        return serving.create_error_response(str(e), param=e.param)
    if entry is None:
        return await original(serving, request, raw_request)
    try:
        call = await _start_call(serving, request, field, entry)
    except ThinkMergeError as e:
        return serving.create_error_response(str(e), param=e.param)
    raw_request.state.sgl_merge = call
    response = await original(serving, request, raw_request)
    return _with_results(response, call, chat=_is_chat(serving))


async def handle_streaming_request(original, serving, adapted_request, request, raw_request):
    """AROUND the routes' _handle_streaming_request. SGLang waits for the first answer chunk
    before it sends the headers (so early errors can still be 400s); a think_merge call answers only
    after thinking, so its stream starts at once, and its progress chunks arrive while it thinks."""
    from fastapi.responses import StreamingResponse

    call = _call_of(raw_request)
    if call is None:
        return await original(serving, adapted_request, request, raw_request)
    chat = _is_chat(serving)
    make = serving._generate_chat_stream if chat else serving._generate_completion_stream
    # SGLang's abort-on-disconnect task reads fields that only its generate_request sets; aimed at
    # the leader's rid, its abort reaches every member too (the scheduler matches rid prefixes).
    adapted_request.rid, adapted_request.is_single = call.rid, True
    return StreamingResponse(_stream(make(adapted_request, request, raw_request), call, chat),
                             media_type="text/event-stream",
                             background=serving.tokenizer_manager.create_abort_task(adapted_request))


def generate_request(original, manager, obj, *args, **kwargs):
    """AROUND TokenizerManager.generate_request: the flow for the one generation of a marked call;
    for other requests, the routing-key check of a server behind a gateway (`routing`)."""
    raw_request = args[0] if args else kwargs.get("request")
    call = _call_of(raw_request)
    if call is None:
        check_routing_key(obj, raw_request)
    if call is None or call.started:
        return original(manager, obj, *args, **kwargs)
    call.started = True
    return run(original, manager, obj, raw_request, call)


# ------------------------------------------------------------------ the request


def _call_of(raw_request) -> ThinkMergeCall | None:
    return getattr(getattr(raw_request, "state", None), "sgl_merge", None)


def _is_chat(serving) -> bool:
    from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat

    return isinstance(serving, OpenAIServingChat)


async def _think_merge_entry(serving, raw_request) -> tuple[str | None, object]:
    """The body's think_merge or parathink field and entry, (None, None) when absent (or null, or
    not one of the two routes); both at once is a ThinkMergeError."""
    from sglang.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion

    if raw_request is None or not (_is_chat(serving) or isinstance(serving, OpenAIServingCompletion)):
        return None, None
    raw = await raw_request.body()
    if not any(f'"{name}"'.encode() in raw for name in FIELDS):
        return None, None
    body = await raw_request.json()
    present = [name for name in FIELDS if isinstance(body, dict) and body.get(name) is not None]
    if len(present) > 1:
        raise ThinkMergeError(PARATHINK, f"{FIELD} and {PARATHINK} are two methods: send one of them")
    return (present[0], body[present[0]]) if present else (None, None)


async def _start_call(serving, request, field: str, entry) -> ThinkMergeCall:
    manager = serving.tokenizer_manager
    max_group = await _max_group_size(manager)
    config = parse(field, entry, max_group)
    width = "k" if field == FIELD else "paths"
    if (request.n or 1) > 1:
        raise ThinkMergeError("n", f"n={request.n} cannot be combined with {field}: a {field} call returns one "
                              f"answer; set {field}.{width} for the number of parallel traces")
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], (str, list)):
        raise ThinkMergeError("prompt", f"{field} takes one prompt per request, got a batch of {len(prompt)}")
    delimiters = think_token_ids(manager.tokenizer)
    if delimiters is None:
        raise ThinkMergeError(field, f"{field} needs a thinking model, and the tokenizer of "
                              f"{manager.server_args.model_path} has no <think> / </think> tokens")
    if _is_chat(serving):
        kwargs = request.chat_template_kwargs or {}
        if kwargs.get("enable_thinking") is False:
            raise ThinkMergeError("chat_template_kwargs.enable_thinking",
                                  f"chat_template_kwargs.enable_thinking is false, but {field} thinks first; "
                                  "drop one of them")
        request.chat_template_kwargs = {"enable_thinking": True, **kwargs}
        request.separate_reasoning = False  # the answer phase starts after </think>: nothing to separate
    rid = request.rid if isinstance(request.rid, str) and request.rid else f"thinkmerge-{uuid.uuid4().hex}"
    paths = None if field == FIELD else path_layout(manager.tokenizer, config, manager.server_args.model_path)
    answer = merged_answer if field == FIELD else summarize
    return ThinkMergeCall(config=config, answer=answer, rid=rid, model=request.model, close_id=delimiters[1],
                          paths=paths)


async def _max_group_size(manager) -> int | None:
    if not _max_group:
        states = await manager.get_internal_state()
        sizes = [(st.get("sgl_merge") or {}).get("max_group_size") for st in states if isinstance(st, dict)]
        _max_group.append(min((s for s in sizes if s), default=0))
    return _max_group[0] or None


# ------------------------------------------------------------------ the response


def _with_results(response, call: ThinkMergeCall, chat: bool):
    """A non-streamed response with the call's results added (streams get them in `_stream`)."""
    from fastapi.responses import Response
    from pydantic import BaseModel

    if not isinstance(response, BaseModel):
        return response  # a stream, or an error response
    data = json.loads(response.model_dump_json(by_alias=True))
    if chat:
        for choice in data.get("choices") or []:
            choice["message"]["reasoning_content"] = choice["message"].get("reasoning_content") or call.reasoning_text()
    data[EXTENSION] = call.summary()
    return Response(content=json.dumps(data), media_type="application/json")


async def _stream(chunks, call: ThinkMergeCall, chat: bool):
    """SGLang's SSE chunks, with the call's progress before them and its results at the end."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def frame(choices: list, extension: dict) -> str:
        body = {"id": call.rid, "object": kind, "created": call.created, "model": call.model, "choices": choices,
                EXTENSION: extension}
        return f"data: {json.dumps(body)}\n\n"

    chunks = chunks.__aiter__()
    step = event = None
    phase, start, heartbeat = "thinking", time.monotonic(), max(seconds(HEARTBEAT_ENV, 5.0), 0.1)
    try:
        while True:
            step = step or asyncio.ensure_future(chunks.__anext__())
            event = asyncio.ensure_future(call.events.get())
            await asyncio.wait({step, event}, timeout=heartbeat, return_when=asyncio.FIRST_COMPLETED)
            progress = [event.result()] if event.done() else []
            event.cancel()
            if not progress and not step.done():  # silence: only the thinking phase can be this long
                if phase == "thinking":
                    yield frame([], {"phase": phase, "elapsed_s": round(time.monotonic() - start, 1)})
                continue
            while not call.events.empty():  # all progress so far goes before the next answer chunk
                progress.append(call.events.get_nowait())
            for item in progress:
                phase = item["phase"]
                yield frame([], item)
                if chat and item["phase"] == "answering":
                    delta = {"role": "assistant", "reasoning_content": call.reasoning_text()}
                    yield frame([{"index": 0, "delta": delta, "finish_reason": None}], item)
            if step.done():
                try:
                    chunk = step.result()
                except StopAsyncIteration:
                    return
                step = None
                text = chunk.decode() if isinstance(chunk, bytes) else chunk
                if text.strip() == "data: [DONE]":
                    yield frame([], {"phase": "done", **call.summary()})
                yield chunk
    finally:
        for task in (step, event):
            if task is not None and not task.done():
                task.cancel()
        if step is not None:
            await asyncio.gather(step, return_exceptions=True)  # let the flow abort what runs


# (target, kind, function), as in sgl_merge.runtime.hooks.HOOKS
HOOKS = [
    ("sglang.srt.entrypoints.openai.serving_base.OpenAIServingBase.handle_request", "AROUND", handle_request),
    ("sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._handle_streaming_request", "AROUND",
     handle_streaming_request),
    ("sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._handle_streaming_request", "AROUND",
     handle_streaming_request),
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request", "AROUND", generate_request),
]
