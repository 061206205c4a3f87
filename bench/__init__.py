"""Benchmarks of tqindex: codec distortion, search speed, recall against FAISS, KV-cache quality."""
