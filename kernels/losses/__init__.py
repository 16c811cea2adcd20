"""The losses, one module per family: a functional backed by one autograd Function, and a thin module."""
