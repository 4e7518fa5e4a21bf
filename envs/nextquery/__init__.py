"""RecGPT-Mobile (../shared/papers/recgpt_mobile.md): an on-device next-search-query agent.

Importing the package registers its datasets, prompt builders, rewards and metric set (rl.registry),
the way every paper under envs/ plugs into the core.
"""
from envs.nextquery import drift, prompts, quality, rewards  # noqa: F401  (registration: N2 prompt builders, rewards)
from envs.nextquery import metrics  # noqa: F401  (registration: N1 metric set "nextquery")
