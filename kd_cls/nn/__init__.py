"""Shared network parts: connectors, BatchNorm folding and the frozen teacher.

Above ``losses``/``hooks``/``config`` and below the models and methods; both
frontends build on these modules.
"""
