"""CoNRec: negative-feedback recommendation with semantic item IDs, on real MovieLens-100k ratings (docs/negrec.md).

A plugin (`plugins: [envs.negrec]`): importing it registers the stage prompt builders, the future-negative
reward and the examples dataset (`rl`), the `negrec` metric set (`metrics`) and the top-K beam-search
agent `negrec_topk` (`agent`). Data and semantic IDs are built by `python -m envs.negrec build`
(`data`, `sid`, `swing`, `tasks`, `build`); the modules that need MiniLM import it where used, so a
recipe that only trains needs no extra package.
"""

from envs.negrec import agent, metrics, rl  # noqa: F401  (registrations)
