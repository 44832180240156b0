"""kd-toolkit: knowledge distillation for classification (kd_cls) and detectron2 detection (kd_det).

Versions are not pinned here, so ``pip install -e .`` works in an environment
that already has its own torch (and detectron2, for kd_det). The pinned,
tested environment is ``requirements.txt`` + ``tools/install_detectron2.sh``
(``make venv``).
"""
from setuptools import find_packages, setup

setup(
    name="kd-toolkit",
    version="0.1.0",
    description="Knowledge distillation for computer vision: DKD, DOT, ReviewKD and more, on PyTorch and detectron2",
    packages=find_packages(include=["kd_cls", "kd_cls.*", "kd_det", "kd_det.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=1.12",
        "torchvision",
        "numpy",
        "fvcore",
        "yacs",
        "tqdm",
        "tensorboard",
        "scikit-learn",
        "Pillow",
    ],
    extras_require={
        # detectron2 itself is installed separately (it is not on PyPI).
        "det": ["pycocotools", "opencv-python-headless", "matplotlib"],
        "wandb": ["wandb"],
    },
)
