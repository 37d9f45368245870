"""cotrr-ray: a listwise attention reranker trained with Ray Train and served with Ray Serve."""

__version__ = "0.1.0"
