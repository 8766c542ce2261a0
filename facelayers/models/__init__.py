"""Reference models assembled from facelayers layers (torchtune's ``models/`` half of the
``models/`` vs ``recipes/`` split: the training and inference scripts live in ``examples/``).

* :mod:`facelayers.models.ssm` -- the SSM paper's model: config, model from injected parts,
  builders, self-checking safetensors + JSON checkpoints, video inference, benchmark data.
"""
