"""hubtune: select, tune, combine and serve models from a hub of pre-trained checkpoints.

The library is three packages, in layers (docs/architecture.md):

- `jaxmodels`: what a model is and how it runs (data, models, weights, inference, committees);
- `scoring`: numbers about models without training them (LogME and its peers, hub ranking);
- `training`: producing new weights (fine-tuning runs, soups and merges).

This package is the application on top: the ``hubtune`` command (`hubtune.cli`) and its steps,
`rank`, `tune`, `soup`, `serve` and the `demo`, each a ``main(argv) -> int``.
"""
