"""A stand-in for vLLM's OpenAI-compatible server, for the server engine's failure tests.

    python tests/fake_vllm_server.py --port PORT [--delay S] [--mode ok|hang|no_token_ids]

Answers `GET /v1/models`, `GET /health` and `POST /v1/completions` in vLLM 0.32's shape
(choices with `index`, `text`, `token_ids`, `logprobs.token_logprobs`, `finish_reason`,
`stop_reason`), after sleeping `--delay` seconds. Completions are deterministic:
`max_tokens` token ids counting up from the prompt's last id, each with log-prob -0.5,
finish reason "length". Modes: `ok`; `hang` (completions never answer, the connection
stays open); `no_token_ids` (choices without `token_ids`, like a vLLM too old for
`return_token_ids` or another OpenAI-compatible server). `GET /inflight` tells how many
completions are being answered right now (tests wait for it before killing the server),
and what the weight-sync endpoints received: `POST /collective_rpc` (the JSON bodies, in
order, under `collective_rpc`), `POST /reset_prefix_cache` and `/reset_encoder_cache` (counts); they answer
like vLLM's dev endpoints, without loading anything. The weight-transfer routes of vLLM
0.32's RL router (`GET /get_world_size` answering `--world-size`, and `POST
/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`,
`/finish_weight_update`, `/shutdown_weight_transfer_engine`) record (route, JSON body) in
order under `weight_transfer`; `--no-weight-transfer` leaves them out (404, like a server
started without VLLM_SERVER_DEV_MODE).
`POST /inference/v1/generate` (vLLM's token-in route, which the engine uses for prompts with
images) records the request bodies under `generate` and answers like `/v1/completions`, in that
route's shape (`logprobs.content` entries with `token_id` and `logprob` -0.25).
No vLLM, no model: FastAPI + uvicorn only, starts in about a second.
"""

from __future__ import annotations

import argparse
import asyncio

from fastapi import FastAPI, Request

MODEL = "fake-model"


WEIGHT_TRANSFER_POSTS = ("init_weight_transfer_engine", "start_weight_update", "update_weights",
                         "finish_weight_update", "shutdown_weight_transfer_engine")


def make_app(delay: float = 0.0, mode: str = "ok", world_size: int | None = 1) -> FastAPI:
    app = FastAPI()
    state = {"inflight": 0, "served": 0, "collective_rpc": [], "reset_prefix_cache": 0, "weight_transfer": [],
             "generate": [], "reset_encoder_cache": 0}

    if world_size is not None:
        @app.get("/get_world_size")
        async def get_world_size():
            return {"world_size": world_size}

        def record(route: str):
            async def handler(request: Request):
                body = await request.json() if await request.body() else None
                state["weight_transfer"].append([route, body])
                return {"message": route}
            app.post(f"/{route}")(handler)

        for route in WEIGHT_TRANSFER_POSTS:
            record(route)

    @app.get("/health")
    async def health():
        return {}

    @app.get("/inflight")
    async def inflight():
        return dict(state)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "vllm"}]}

    @app.post("/collective_rpc")
    async def collective_rpc(request: Request):
        state["collective_rpc"].append(await request.json())
        return {"results": [None]}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        state["reset_prefix_cache"] += 1
        return {}

    @app.post("/reset_encoder_cache")
    async def reset_encoder_cache():
        state["reset_encoder_cache"] += 1
        return {}

    @app.post("/inference/v1/generate")
    async def generate(request: Request):  # vLLM's token-in route (prompts with images): bodies recorded
        body = await request.json()
        state["generate"].append(body)
        sampling = body["sampling_params"]
        ids = [(body["token_ids"][-1] + k + 1) % 1000 for k in range(sampling.get("max_tokens") or 16)]
        content = [{"token_id": t, "logprob": -0.25} for t in ids]
        return {"choices": [{"index": i, "token_ids": ids, "logprobs": {"content": content}, "finish_reason": "length",
                             "stop_reason": None} for i in range(sampling.get("n") or 1)],
                "prompt_token_ids": None}  # a real server expands the placeholders; this one cannot

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        state["inflight"] += 1
        try:
            if mode == "hang":
                await asyncio.Event().wait()  # never set: no answer, the connection stays open
            await asyncio.sleep(delay)
            prompt = body["prompt"]
            start = prompt[-1] if prompt else 0
            ids = [(start + k + 1) % 1000 for k in range(body.get("max_tokens") or 16)]
            choices = []
            for i in range(body.get("n") or 1):
                c = {
                    "index": i,
                    "text": "",
                    "logprobs": {"text_offset": [0] * len(ids), "token_logprobs": [-0.5] * len(ids),
                                 "tokens": ["x"] * len(ids), "top_logprobs": [{}] * len(ids)},
                    "finish_reason": "length",
                    "stop_reason": None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": list(prompt),
                    "token_ids": list(ids),
                }
                if mode == "no_token_ids":
                    del c["token_ids"], c["prompt_token_ids"]
                choices.append(c)
            state["served"] += 1
            return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": body.get("model"),
                    "choices": choices,
                    "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids) * len(choices),
                              "total_tokens": len(prompt) + len(ids) * len(choices)}}
        finally:
            state["inflight"] -= 1

    return app


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds before each completion is answered")
    ap.add_argument("--mode", choices=["ok", "hang", "no_token_ids"], default="ok")
    ap.add_argument("--world-size", type=int, default=1, help="what GET /get_world_size answers")
    ap.add_argument("--no-weight-transfer", action="store_true", help="leave the weight-transfer routes out")
    args = ap.parse_args()
    app = make_app(args.delay, args.mode, None if args.no_weight_transfer else args.world_size)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
