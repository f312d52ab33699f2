"""The benchmarks, each a short declaration over mha.bench.framework."""
