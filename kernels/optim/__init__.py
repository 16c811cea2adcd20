"""Optimizer algorithms, one module each: an optimizer declares its state, its scalars and its update once;
the base class (``kernels._runtime.optimizer``) and the precision codecs (``kernels.precision``) do the rest."""
