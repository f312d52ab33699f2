"""The framework every benchmark is built of: contenders, workloads, probes, one report."""
