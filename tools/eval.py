"""Evaluate a model on a validation set; prints ``top-1 <acc> top-5 <acc> loss <value>``.

    python3 tools/eval.py -m resnet32x4                                # released teacher weights
    python3 tools/eval.py -m resnet8x4 -c download_ckpts/dkd_resnet8x4
    python3 tools/eval.py -m resnet8 -c output/<project>/<run>/student_best -d digits
"""
import sys

from kd_cls.engine.cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
