"""Model bundles: save, verify, load."""
