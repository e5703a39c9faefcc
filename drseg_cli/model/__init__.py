"""Models: CLIP/DINO backbones, DR-Seg modules, weights registry. Knows nothing about files."""
