"""Benchmarks: offline throughput and latency, served load, decoding methods and GPU kernels."""
