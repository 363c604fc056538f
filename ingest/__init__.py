"""Ingest: dataset readers, preprocessing, feature extractors and the ingest job.

Data flow: dataset (batches of uint8 images) -> extractor (float32 embeddings)
-> ``search`` store (one Qdrant collection per dataset, size and model).
"""
