"""The benchmarks' shared toolkit (bench/kit/), used by serve_bench, reliability, train_bench and quality_bench.

- machine: `say`, `loadavg`, `machine_info`, /proc CPU accounting (`CpuMeter`) and re-measuring on a busy box;
- bodies: synthetic rerank request bodies;
- load: closed-loop HTTP load (`LoadGen`: wrk or an httpx child process; `RecordingLoadGen`: in-process
  httpx with one record per request), sequential Server-Timing profiles;
- cluster: a fresh local Ray + Serve, serve_config.yaml rewriting, free ports, HTTP helpers, app status;
- bundles: bundle copies and deliberately broken bundles;
- report: tables, plots, JSON, pass/fail reports;
- letor: per-query LETOR metrics and the quality bench's baseline rankers.

The scripts put bench/ on sys.path once at the top, so `import kit` works when they run as
`python bench/<script>.py` and when tests load them by path.
"""
