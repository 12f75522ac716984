"""Real-device side of tiersim: the replay of tier schedules with real copies, microbenchmarks, a live tiered KV
cache, fidelity on a real model. It measures; validate.py compares the measurements with the simulator.

The replay, one concept per file: config.py (ReplayConfig, the model cut to N layers), plan.py (what each step
does to each slot), memory.py (the memory budget), streams.py (clocks and signals between the compute and copy
streams), kernels.py (model-shaped compute; MLA's absorbed attention in mla.py, MoE in moe.py, RMSNorm in
norm.py), device.py (which device, what it is), replay.py (storage, copies, the step loop). Then microbench.py
(the measurements `calibrate` fits), calibrate.py, gpu_suite.py (all GPU work in one command), tiered_cache.py
and fidelity.py.

Nothing is imported here, so `import tiersim.hw` stays cheap; torch loads only inside the functions that run
kernels (and with `tiersim.hw.tiered_cache`, which needs it at import).
"""
