"""Search: the vector store behind one interface (embedded Qdrant Edge or a Qdrant server)
and exact top-k retrieval by vector, by image and by stored point.
"""

from cbmir.search.store import SearchResult, VectorStore, open_store

__all__ = ["SearchResult", "VectorStore", "open_store"]
