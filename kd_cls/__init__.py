"""kd_cls: knowledge distillation for image classification.

The core library of this toolkit: shared distillation losses, feature hooks,
the model zoo, distillers, the DOT optimizer and a trainer. It never imports
detectron2; the detection frontend ``kd_det`` builds on it.
"""
__version__ = "0.1.0"
