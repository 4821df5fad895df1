"""The analyses: one module per analysis, each on top of :mod:`loralens.core` (math) and :mod:`loralens.io` (files).

- :mod:`~loralens.analyses.engine`: what they share (device, module selection, the memory budget and layer batches)
- :mod:`~loralens.analyses.conversion`: conversion matrices ``W^-1 A^T``, ``W^-1 B``, ``W^-1 B A``
- :mod:`~loralens.analyses.similarity`: layer x layer phi of conversion matrices (Figure 1)
- :mod:`~loralens.analyses.condlora_vs_lora`: LoRA vs CondLoRA per layer (Table 3) and parameter counts (Table 4)
- :mod:`~loralens.analyses.seeds`: held-out scores over seeds with the paired t-test (Table 2)
- :mod:`~loralens.analyses.lowrank`: the LoRA paper's Section 7 (subspace overlap, amplification, spectra)
- :mod:`~loralens.analyses.provenance`: input files by path, size and SHA-256, and the versions

Each returns a typed result (a frozen dataclass with ``to_dict()``); none prints or writes files.
The names users need are exported from :mod:`loralens` itself.
"""
