"""DR-Seg trained mode: learnable heads on frozen CLIP/DINO, trainer, checkpoints.

See docs/TRAIN.md. ``checkpoint.load_trained_model(path, device)`` turns a checkpoint into a
ready ``SegmentationModel`` for ``segment``/``evaluate``.
"""
