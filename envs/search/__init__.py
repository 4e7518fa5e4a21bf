"""The Search-R1 / Search-R1++ paper: search environment, rewards, leaderboard metrics, retrieval, QA data.

`plugins: [envs.search]` in a recipe imports this package, which registers:
  ENVIRONMENTS  "search"        envs.search.env.SearchEnvironment (driven by `rollout.agent: multi_turn`)
  REWARDS       search_em, search_f1, search_f1_plus, search_format   (envs.search.rewards)
  METRICS       "search"        the leaderboard's metric set for `python -m eval.run` (envs.search.metrics)

Modules:
- ``envs.search.env``         the environment: action parser, corrective / final-turn messages, templates
- ``envs.search.rewards``     answer extraction, F1+, format-aware reward, the registered rewards
- ``envs.search.metrics``     the leaderboard metric set (EM, F1, answer rate, searches, ...), `evaluate_search`
- ``envs.search.oracle``      oracle warm-start episodes (`python -m envs.search.oracle`)
- ``envs.search.corpus``      Search-R1 jsonl corpora, passage formatting, offline wiki10k corpus
- ``envs.search.retrievers``  ``Retriever`` protocol, ``BM25Retriever``, ``DenseRetriever``
- ``envs.search.server``      FastAPI retrieval server (Search-R1 ``POST /retrieve`` protocol)
- ``envs.search.client``      ``RetrievalClient`` (retries, batching, never raises into a rollout)
- ``envs.search.qa_data``     Search-R1 parquet / FlashRAG jsonl loaders and the wiki QA generator
"""

from rl.plugins import require
from rl.registry import ENVIRONMENTS

# the default in-process retriever (BM25); missing, the search recipes fail in one line naming the extra
require("bm25s", extra="search", plugin="envs.search")

from envs.search import metrics, rewards  # noqa: E402,F401  (register the rewards and the "search" metric set)
from envs.search.env import SearchEnvironment  # noqa: E402

ENVIRONMENTS.register("search", SearchEnvironment)
