"""Models for every tool: building torchvision and ``timm:`` classifiers (students and teachers),
loading weights files safely, and the teacher ensemble. Used by ``fkd-relabel`` (labels) and
``fkd-train`` (students).

- :mod:`.build`: classifiers by name, and the checks that a model takes the set's crops.
- :mod:`.weights`: weights and checkpoint files: ``weights_only`` loading, the state dict inside,
  finiteness, fit.
- :mod:`.teachers`: teachers from a name and weights, their ensemble (mix weights, BN mode, chunks).
"""
