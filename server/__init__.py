"""tqindex REST service: a Qdrant-shaped FastAPI app over tqindex.Index with a write-ahead log and snapshots."""
