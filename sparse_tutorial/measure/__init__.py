"""Measurement: what layers cost by formula, and what they cost on this machine.

* :mod:`.costs`: multiply-adds and bytes of weights one token touches (the "limit" numbers);
* :mod:`.params`: where a Transformer's parameters live, and the dense FF's work and traffic at batch ``B``;
* :mod:`.timing`: timing helpers and machine facts (cache size, bandwidth, matmul speed);
* :mod:`.quantize`: int8 weights, the alternative chapter 5 compares sparsity with;
* :mod:`.memory`: the activation bytes a training step keeps for backward (chapter 7).

The benchmark command built on these is :mod:`sparse_tutorial.bench`.
"""
