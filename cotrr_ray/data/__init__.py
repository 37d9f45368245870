"""Datasets: readers (JSON Lines, LETOR), query-level splits, the synthetic generator."""
