"""Training engine: trainer, checkpoints, metrics, logging, DDP, command lines.

Submodules are imported on use (``kd_cls.engine.trainer`` etc.), so that
``kd_cls.engine.fast`` stays cheap to import for inference code.
"""
