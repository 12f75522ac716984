"""Real-device side of tiersim: a live tiered KV cache, fidelity on a real model, microbenchmarks, validation.

Nothing is imported here, so `import tiersim.hw` stays cheap; torch loads with the submodules that
need it (`tiersim.hw.tiered_cache`, and `tiersim.hw.fidelity` only when a grid runs).
"""
