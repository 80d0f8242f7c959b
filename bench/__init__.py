"""Speed and convergence benchmarks (pytest-benchmark) and the results report."""
