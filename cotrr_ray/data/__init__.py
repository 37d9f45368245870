"""Datasets: readers (JSON Lines, LETOR, Parquet), the converter, query-level splits, the synthetic generator."""
