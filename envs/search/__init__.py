"""Search environment for Search-R1 style agents: corpora, retrievers, retrieval server/client, QA data.

Submodules are imported lazily so that ``import envs.search`` stays cheap:

- ``envs.search.corpus``      Search-R1 jsonl corpora, passage formatting, offline wiki10k corpus
- ``envs.search.retrievers``  ``Retriever`` protocol, ``BM25Retriever``, ``DenseRetriever``
- ``envs.search.server``      FastAPI retrieval server (Search-R1 ``POST /retrieve`` protocol)
- ``envs.search.client``      ``RetrievalClient`` (retries, batching, never raises into a rollout)
- ``envs.search.qa_data``     Search-R1 parquet / FlashRAG jsonl loaders and the wiki QA generator
"""
