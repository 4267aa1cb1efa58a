"""Benchmarks (scripts) and the harness that starts gateway processes for them and for the
multi-replica tests (`import bench.harness`)."""
