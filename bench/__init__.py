"""mailplat's benchmark harness: see docs/benchmarks.md and C{bench/run --help}."""
