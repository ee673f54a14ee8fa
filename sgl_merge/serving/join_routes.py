"""The KV join's HTTP routes, added to SGLang's server app by the plugin in the HTTP process.

`POST /concate_and_append_request {"src_rids": [...], "dst_rid": "..."}` is the route SGLang's own
frontend calls for `forks.join("concate_and_append")`, and SGLang 0.5.23 does not serve it (the
program hangs). The ids in it are the frontend's own state ids, which a stock `RuntimeEndpoint`
never sends to the server, so no server can find those forks' KV: the route answers so the program
goes on, and the join happens as text (the next generation prefills the joined text, a sequential
computation). `sgl_merge.RuntimeEndpoint` makes the same programs join KV for real (docs/kv-join.md).

`POST /sgl_merge/release {"rids": [...], "owner": "<secret>" | [...]}` lets go of kept sources
(`sgl_merge_keep`) before their TTL: through the scheduler's abort path, so every tensor-parallel
rank unlocks them together. A source a join is still reading is released when that join ends; a
keep still running is not kept. Only the owner a source was kept under reaches it, and the answer
is the same whether or not it did (nothing tells whether a rid exists).
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse

from sgl_merge.contract.join import parse_owners
from sgl_merge.contract.merge import MergeSpecError
from sgl_merge.runtime.join import release_rid

logger = logging.getLogger("sgl_merge")

CONCAT_ROUTE = "/concate_and_append_request"
RELEASE_ROUTE = "/sgl_merge/release"
_warned_text_join = False


def _bad_request(message: str):
    return JSONResponse({"error": {"message": message}}, status_code=400)


async def _json_object(request: Request):
    try:
        body = await request.json()
    except ValueError:
        body = None
    return body if isinstance(body, dict) else None


def _rid_list(body, name: str) -> list[str] | None:
    value = body.get(name)
    if isinstance(value, list) and value and all(isinstance(r, str) and r for r in value):
        return value
    return None


async def concate_and_append_request(request: Request):
    global _warned_text_join
    body = await _json_object(request)
    if body is None or _rid_list(body, "src_rids") is None:
        return _bad_request('src_rids must be a non-empty list of ids: {"src_rids": ["<id>", ...], "dst_rid": "<id>"}')
    if not isinstance(body.get("dst_rid"), str) or not body["dst_rid"]:
        return _bad_request('dst_rid must be the id of the state the forks join into: {"src_rids": [...], '
                            '"dst_rid": "<id>"}')
    message = ("joined as text: the next generation prefills the joined text. The frontend's state ids never "
               "reach the server, so their KV cannot be found; use sgl_merge.RuntimeEndpoint for a KV join")
    if not _warned_text_join:
        _warned_text_join = True
        logger.warning("sgl-merge: %s %s", CONCAT_ROUTE, message)
    return {"success": True, "kv_join": False, "message": message}


async def release(request: Request):
    from sglang.srt.entrypoints.http_server import get_global_state
    from sglang.srt.managers.io_struct import AbortReq

    body = await _json_object(request)
    rids = None if body is None else _rid_list(body, "rids")
    if rids is None:
        return _bad_request('rids must be a non-empty list of kept request ids: {"rids": ["<rid>", ...], '
                            '"owner": "<secret>"}')
    if body.get("owner") is None:
        return _bad_request("owner is required: the owner the sources were kept under (the sgl_merge_keep.owner you "
                            "sent, or meta_info.sgl_merge_keep.owner of the keep's response), one for all or a list")
    try:
        owners = parse_owners(body["owner"], len(rids), "owner")
    except MergeSpecError as e:
        return _bad_request(str(e))
    manager = get_global_state().tokenizer_manager
    for owner, rid in zip(owners, rids):
        manager._dispatch_to_scheduler(AbortReq(rid=release_rid(owner, rid)))
    return {"success": True, "released": rids}


def add_routes(app) -> None:
    app.add_api_route(CONCAT_ROUTE, concate_and_append_request, methods=["POST"])
    app.add_api_route(RELEASE_ROUTE, release, methods=["POST"])
