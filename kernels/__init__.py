"""varbench.kernels: custom kernels, each with a pure-torch reference beside it.

Kernels depend on torch (and optionally Triton) only; they never import the harness or the variants.
The block-sparse Markov attention (HMAR) and the KV-cache compaction gather (KV policies) land here with
the variants that need them.
"""
