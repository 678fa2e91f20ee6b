"""The core: the one scale loop (loop.py), its sampling layer (sampling.py), the registries (registry.py), KV
caches (kv_cache.py), records and environment (records.py), checkpoint loading (checkpoints.py), hashing
(hashing.py) and timers and memory meters (measure.py). Imports nothing of the project but the kernels."""
