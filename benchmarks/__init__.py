"""Speed and memory of optadvisor's kernels against torch, measured in one run (see README)."""
