"""The published dataset layouts, read into pairs: the dataset contract and its built-in entries,
the SEN12MS-style tree scan, split lists, pair lists, the per-band scans, and the synthetic
generators that write those layouts. Torch-free.
"""
