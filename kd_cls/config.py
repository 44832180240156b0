"""Configuration: the ``CfgNode`` class and the base nodes of mdistiller's schema.

This module is the ground floor and imports nothing from the toolkit. The full
config is assembled at the top, as detectron2 projects do
(``cfg = get_cfg(); add_pointrend_config(cfg)``): :func:`kd_cls.engine.get_cfg`
takes :func:`base_cfg` and adds each method's node (declared next to the
method's code) and the optimizer's. Files may use ``_BASE_``.
"""
from __future__ import annotations

import difflib
import os
from typing import List, Tuple

import yaml
from fvcore.common.config import CfgNode as _FvCfgNode

__all__ = ["CfgNode", "ConfigError", "base_cfg", "check_yaml_file", "config_file_chain", "config_key_error"]


class ConfigError(ValueError):
    """A bad key or value in a config file or override list (one-line message)."""


class CfgNode(_FvCfgNode):
    """fvcore's CfgNode (``_BASE_`` inheritance) with one-line errors for typos."""

    def _typo(self, err: Exception) -> ConfigError:
        return config_key_error(self, err)

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        config_file_chain(cfg_filename)  # one-line errors for a bad file or _BASE_ before fvcore reads them
        try:
            super().merge_from_file(cfg_filename, allow_unsafe=allow_unsafe)
        except (KeyError, AssertionError) as e:
            raise self._typo(e) from None

    def merge_from_list(self, cfg_list: list) -> "CfgNode":
        if len(cfg_list) % 2:
            raise ConfigError(
                f"overrides must be KEY VALUE pairs; got an odd number of items: {' '.join(map(str, cfg_list))}"
            )
        try:
            super().merge_from_list(cfg_list)
        except KeyError as e:
            raise self._typo(e) from None
        except AssertionError as e:
            raise self._typo(e) from None
        return self

    def merge_from_other_cfg(self, cfg_other) -> None:
        try:
            super().merge_from_other_cfg(cfg_other)
        except KeyError as e:
            raise self._typo(e) from None


def check_yaml_file(path: str) -> dict:
    """The mapping a config file holds, or a one-line error: missing, not YAML (with the line), empty, not a mapping."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} cannot be read as a config file ({type(e).__name__}: {e})") from None
    if data is None:
        raise ConfigError(f"{path} is empty; a config file holds KEY: VALUE pairs (and _BASE_ to inherit one)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a config: expected KEY: VALUE pairs, found a {type(data).__name__}")
    return data


def config_file_chain(path: str) -> List[Tuple[str, dict]]:
    """``[(file, its own yaml dict)]`` of a config file and its ``_BASE_`` files, the file first."""
    out, todo = [], [os.path.abspath(path) if os.path.isfile(path) else path]
    while todo:
        p = todo.pop(0)
        d = check_yaml_file(p)
        out.append((p, d))
        base = d.get("_BASE_")
        if base:
            base = os.path.expanduser(base)
            if not os.path.isabs(base) and "://" not in base:
                base = os.path.join(os.path.dirname(p), base)
            if not os.path.isfile(base):
                raise FileNotFoundError(f"_BASE_ of {p} not found: {base}")
            todo.append(base)
    return out


def config_key_error(node, err: Exception, where: str = "") -> ConfigError:
    """A one-line ``ConfigError`` for a yacs/fvcore merge error, with "did you mean" for an unknown key.

    Works for any ``CfgNode`` (detectron2's too); ``where`` (a file name) prefixes the message.
    """
    msg = str(err.args[0]) if err.args else str(err)
    prefix = f"{where}: " if where else ""
    if "Non-existent" not in msg:
        return ConfigError(prefix + msg.replace("\n", " "))
    key = msg.rsplit(":", 1)[-1].strip()
    close = difflib.get_close_matches(key, _flatten_keys(node), n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"{prefix}unknown config key {key!r}.{hint}")


def _flatten_keys(node, prefix: str = "") -> List[str]:
    keys = []
    for k, v in node.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, dict):
            keys.extend(_flatten_keys(v, full + "."))
    return keys


def base_cfg() -> CfgNode:
    """The nodes every run has: EXPERIMENT, DATASET, DISTILLER, SOLVER, LOG (mdistiller's keys and defaults)."""
    C = CfgNode
    cfg = C()

    cfg.EXPERIMENT = C()
    cfg.EXPERIMENT.PROJECT = "distill"
    cfg.EXPERIMENT.NAME = ""
    cfg.EXPERIMENT.TAG = "default"
    cfg.EXPERIMENT.SEED = 0  # not in mdistiller: runs here are seeded

    cfg.DATASET = C()
    cfg.DATASET.TYPE = "cifar100"
    cfg.DATASET.NUM_WORKERS = 2
    cfg.DATASET.ROOT = "./data"  # not in mdistiller, which hard-codes ./data
    # Not in mdistiller: crop/flip/normalize whole batches on the training device
    # (bit-identical to the per-image torchvision transforms; see kd_cls.data.batch_aug).
    cfg.DATASET.BATCH_AUG = True
    # Not in mdistiller: keep only the first N images of each split (0: all), for smoke runs.
    cfg.DATASET.SUBSET = 0
    cfg.DATASET.TEST = C()
    cfg.DATASET.TEST.BATCH_SIZE = 64

    cfg.DISTILLER = C()
    cfg.DISTILLER.TYPE = "NONE"
    cfg.DISTILLER.TEACHER = "ResNet50"
    cfg.DISTILLER.STUDENT = "resnet32"
    # Not in mdistiller: a teacher checkpoint path that overrides the default location.
    cfg.DISTILLER.TEACHER_WEIGHTS = ""

    cfg.SOLVER = C()
    cfg.SOLVER.TRAINER = "base"
    cfg.SOLVER.BATCH_SIZE = 64
    cfg.SOLVER.EPOCHS = 240
    cfg.SOLVER.LR = 0.05
    cfg.SOLVER.LR_DECAY_STAGES = [150, 180, 210]
    cfg.SOLVER.LR_DECAY_RATE = 0.1
    cfg.SOLVER.WEIGHT_DECAY = 0.0001
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.TYPE = "SGD"
    # Not in mdistiller: speed options that leave results unchanged (see README).
    cfg.SOLVER.AMP = ""  # "", "bf16" or "fp16"
    cfg.SOLVER.COMPILE = False
    cfg.SOLVER.CHANNELS_LAST = True  # NHWC convolutions: faster with oneDNN (CPU) and cuDNN
    cfg.SOLVER.FOLD_TEACHER_BN = True
    # Not in mdistiller: a folder of teacher-logit caches ("" = off). Methods that read only the
    # teacher's logits (KD, DKD) then run the teacher once per (image, augmentation view) across
    # all runs that share the teacher and data (see docs/teacher_cache.md).
    cfg.SOLVER.TEACHER_CACHE = ""

    cfg.LOG = C()
    cfg.LOG.TENSORBOARD_FREQ = 500
    cfg.LOG.SAVE_CHECKPOINT_FREQ = 40
    cfg.LOG.PREFIX = "./output"
    cfg.LOG.WANDB = False  # mdistiller defaults to True
    cfg.LOG.EVAL_TEACHER = True  # log the teacher's own top-1 at start
    return cfg

