"""Serving: HTTP contract, the router's logic as plain objects, scorer/calibrator cores, Ray Serve shells."""
