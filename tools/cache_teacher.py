"""Fill the teacher-logit cache of a config, so that runs sharing the teacher skip its forward pass.

    python3 tools/cache_teacher.py --cfg configs/cifar100/dkd/res32x4_res8x4.yaml SOLVER.TEACHER_CACHE ./teacher_cache
    python3 tools/cache_teacher.py --help  (options and examples)
"""
import sys

from kd_cls.engine.cli import cache_main as main

if __name__ == "__main__":
    sys.exit(main())
