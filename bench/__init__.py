"""Benchmarks: they measure and print (make bench-fetch, bench-train, bench-gpu, bench-quality)."""
