"""State precision as codecs around an optimizer's one declared float32 update.

An optimizer declares its state and its update once (``_fused_update(hp, *flags, p, g, *state)``, elementwise,
in the compute dtype); a codec wraps *load -> update -> store* around it:

- :func:`~.codecs.bf16_state` — state kept in bfloat16, loaded as float32, stored with stochastic rounding;
- :func:`~.codecs.blockwise_8bit` — state kept as 8-bit codes with a float32 scale per block (signed int8 for
  state that may be negative, unsigned uint8 for non-negative state), decoded before and encoded after;
- :func:`~.codecs.kahan` — the parameter itself (bfloat16/float16) carried with a compensation buffer.

So an optimizer written once gets every variant. A C kernel is an optional accelerator registered per
(update, codec) in :mod:`.accelerators`; where none is registered, or the library is unavailable, the
codec's torch-op path runs with the same numbers.

The modules are imported by path (``kernels.precision.codecs``), not re-exported here: ``_bf16state`` reads
the accelerator table, and the codecs build on ``_bf16state``.
"""
