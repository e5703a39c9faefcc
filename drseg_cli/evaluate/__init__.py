"""Benchmark evaluation: dataset layouts, streamed confusion matrix, mIoU/mACC.

See docs/EVALUATE.md.
"""
