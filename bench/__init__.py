"""editfarm benchmarks: one command per benchmark (``python -m bench.<name>``), see bench/README.md."""
