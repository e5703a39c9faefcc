"""drseg: open-vocabulary semantic segmentation of geospatial imagery (DR-Seg)."""

__version__ = "0.1.0"
