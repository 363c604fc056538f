"""cbmir: content-based medical image retrieval (console script and settings).

Data flows one way: ``ingest`` (dataset -> preprocessing -> extractor -> store)
-> ``search`` (exact top-k in Qdrant) -> ``evaluation`` (metrics, reports).
"""

__version__ = "0.1.0"
