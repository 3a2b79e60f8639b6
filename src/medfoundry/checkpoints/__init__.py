"""The training-checkpoint file format: atomic, rotating, checksummed files and sharded folders.

Below ``train/`` so that models (loading a run folder as pretrained weights), evaluation and export can read
checkpoints without importing the training loop. :mod:`~medfoundry.checkpoints.format` writes and reads
them; :mod:`~medfoundry.checkpoints.integrity` records and verifies their size and SHA-256.
"""
