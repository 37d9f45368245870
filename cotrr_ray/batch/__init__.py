"""Offline batch reranking: a whole dataset through the serving core with Ray Data (`python -m cotrr_ray.batch`)."""
