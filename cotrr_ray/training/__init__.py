"""Training: the plain-PyTorch loop, the Ray Train job, cross-fitting, evaluation, plots."""
