"""Train a classification student (mdistiller's command line).

    python3 tools/train.py --cfg configs/cifar100/dkd/res32x4_res8x4.yaml SOLVER.BATCH_SIZE 128 SOLVER.LR 0.1
    torchrun --nproc_per_node 2 tools/train.py --cfg ... (DDP)
    python3 tools/train.py --cfg ... --resume (same overrides: continues the run from its latest checkpoint)
"""
import sys

from kd_cls.engine.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
