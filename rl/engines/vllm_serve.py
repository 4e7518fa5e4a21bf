"""`python -m rl.engines.vllm_serve --model DIR [any vLLM api_server option]`: vLLM's OpenAI-compatible
server, started after `rl.engines.vllm_vision.prepare_vllm_for_vlm` ran for DIR's model.

Why a launcher: a LLaVA or Qwen2-VL checkpoint needs the stand-ins and registrations of
`prepare_vllm_for_vlm` to start on vLLM 0.32 without torchvision, and they live in the process that
makes them. vLLM's server runs its engine core and workers in processes started with `spawn` (forced on
CPU), which import the parent's main module as `__mp_main__`, so this module is that main module: vLLM's
`api_server` runs inside it (as `python -m vllm.entrypoints.openai.api_server` would), the model directory
travels in `AGENTRL_VLLM_SERVE_MODEL`, and every process that imports this module (the server, its
spawned engine core and workers) prepares vLLM for that model at import. For a text model it changes nothing.

Vision-language prompts reach the server through `/inference/v1/generate`, which vLLM serves only with
`--enable-scale-out`; the `vllm_server` engine says so when it is missing.
"""

from __future__ import annotations

import os
import runpy
import sys


def _model_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return None


_ENV = "AGENTRL_VLLM_SERVE_MODEL"


def _prepare(model: str) -> None:
    from transformers import AutoConfig

    from rl.engines.vllm_vision import prepare_vllm_for_vlm

    prepare_vllm_for_vlm(AutoConfig.from_pretrained(model))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    model = _model_arg(argv)
    if model is None:
        raise SystemExit("python -m rl.engines.vllm_serve: --model DIR is required (the checkpoint to serve)")
    os.environ[_ENV] = model  # for the spawned engine-core and worker processes (see the module doc)
    _prepare(model)
    sys.argv = ["vllm.entrypoints.openai.api_server", *argv]
    # alter_sys=False: this module stays `__main__`, so spawned children import it (and prepare vLLM)
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=False)


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__" and os.environ.get(_ENV):  # a process vLLM spawned from the server
    _prepare(os.environ[_ENV])
