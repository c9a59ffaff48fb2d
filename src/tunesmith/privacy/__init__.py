"""Privacy: differentially private training, and measuring what a tuned model memorised.

Differentially private training (DP-SGD) plugs into the loop at its three seams: the sampler
(``PoissonBatches`` for ``Batches.epoch``), the optimizer step (``DPStep`` for ``fit(make_step=...)``)
and the model (per-example gradients through ``torch.func``, on the model the loop prepared). The
privacy unit is one training example: each row of a batch holds one, and each one's gradient is
clipped on its own. Epsilon comes from Opacus's accountants (``accounting``). ``training`` puts the
pieces together for the recipe; ``options`` holds the ``privacy:`` section.

The memorisation audit (``audit``, ``canaries``) measures canary exposure and membership inference
on a finished run.
"""
