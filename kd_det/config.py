"""Config for detection distillation: ``add_kd_config`` and ``get_kd_cfg``.

A distillation config is complete with three things: ``_BASE_: <a student
detector config>``, ``TEACHER.CONFIG_FILE: <a teacher detector config>`` (a
path, or a detectron2 model-zoo name) and a non-empty ``KD.METHODS``. Keys:

* ``KD.METHODS``: method names, run together (``[]``: plain training);
* ``KD.<METHOD>.*``: each method's keys, declared in its own file;
* ``KD.IMPORTS``: modules (or ``.py`` paths) imported before anything else, so
  a user's own methods register (as mmengine's ``custom_imports``);
* ``KD.INHERIT``: ``["neck"]``, ``["head"]`` or both: initialise those parts of
  the student from the teacher (same family);
* ``KD.TYPE``: mdistiller's method choice, read only for ``RCNNKD``;
* ``KD.ALLOW_RANDOM_TEACHER`` (tests, benchmarks), ``KD.FOLD_TEACHER_BN``,
  ``KD.TEACHER_CHANNELS_LAST``, ``KD.FAST_ROI_ALIGN`` (speed, same results);
* ``TEACHER.*``: the teacher's overrides (see :mod:`kd_det.teacher_cfg`).

Keys keep mdistiller's names (``KD.TYPE``, ``KD.DKD.*``, ``KD.REVIEWKD.*``,
``TEACHER.*``, ``MODEL.MOBILENETV2.*``) so its detection configs load unchanged.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import sys
from typing import List, Optional, Sequence

import yaml

from detectron2.config import CfgNode as CN

from kd_cls.config import ConfigError, config_file_chain, config_key_error

from .defaults import add_kd_config, d2_defaults
from .teacher_cfg import KD_TYPES, build_teacher_cfg, kd_method_names, resolve_teacher_config_file

__all__ = ["ConfigError", "add_kd_config", "build_teacher_cfg", "get_kd_cfg", "merge_kd_opts", "KD_TYPES",
           "import_kd_modules"]


def _lookup(node, keys: Sequence[str]):
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            raise KeyError(".".join(keys))
        node = node[k]
    return node


def merge_kd_opts(cfg: CN, opts: Optional[List[str]]) -> CN:
    """``cfg.merge_from_list(opts)`` that also accepts ``TEACHER.<any detectron2 key>``.

    A ``TEACHER.X.Y`` key not yet in ``cfg`` is created when ``X.Y`` is a valid
    detectron2 key; otherwise the error names the key.
    """
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs; got an odd number of items: {' '.join(opts)}")
    defaults = None
    for key in opts[0::2]:
        parts = key.split(".")
        if parts[0] != "TEACHER" or len(parts) < 2:
            continue
        try:
            _lookup(cfg, parts)
            continue
        except KeyError:
            pass
        defaults = defaults or d2_defaults()
        try:
            default = _lookup(defaults, parts[1:])
        except KeyError:
            e = KeyError(f"Non-existent config key: {'.'.join(parts[1:])}")
            raise ConfigError(f"{key!r}: " + str(config_key_error(defaults, e))) from None
        node = cfg.TEACHER
        for p in parts[1:-1]:
            if p not in node:
                node[p] = CN(new_allowed=True)
            node = node[p]
        node[parts[-1]] = copy.deepcopy(default)
    try:
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError, ValueError) as e:
        raise config_key_error(cfg, e) from None
    cfg.TEACHER.set_new_allowed(True)
    return cfg


# ----------------------------------------------------------------------------- KD.IMPORTS
def _raw_value(chain_dicts: List[dict], keys: Sequence[str], opts: Sequence[str]):
    """The value of ``KD.X`` as the file chain and the overrides set it (None if never set)."""
    dotted = ".".join(keys)
    for k, v in zip(opts[0::2], opts[1::2]):
        if k == dotted:
            return yaml.safe_load(v) if isinstance(v, str) else v
    for d in chain_dicts:  # main file first
        try:
            return _lookup(d, keys)
        except KeyError:
            continue
    return None


def import_kd_modules(names: Sequence[str]) -> None:
    """Import ``KD.IMPORTS`` entries: dotted module names, or paths of ``.py`` files."""
    for name in names:
        try:
            if str(name).endswith(".py"):
                path = os.path.abspath(name)
                mod_name = "kd_user_" + os.path.splitext(os.path.basename(path))[0]
                if mod_name in sys.modules:
                    continue
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"no file {path}")
                spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(str(name))
        except Exception as e:  # any failure of user code is reported in one line
            raise ConfigError(f"KD.IMPORTS: cannot import {name!r} ({type(e).__name__}: {e}); give a module "
                              "on PYTHONPATH or the path of a .py file") from None


def get_kd_cfg(config_file: Optional[str] = None, opts: Optional[List[str]] = None, freeze: bool = True) -> CN:
    """detectron2's defaults + :func:`add_kd_config` + a config file + ``KEY VALUE`` overrides.

    ``KD.IMPORTS`` are imported first; ``TEACHER.CONFIG_FILE`` is resolved (see
    :func:`kd_det.teacher_cfg.resolve_teacher_config_file`); the KD keys and the
    teacher config are validated.
    """
    opts = list(opts or [])
    chain = config_file_chain(config_file) if config_file else []
    chain_dicts = [d for _, d in chain]
    import_kd_modules(_raw_value(chain_dicts, ("KD", "IMPORTS"), opts) or [])
    cfg = d2_defaults()
    if config_file:
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, AssertionError, ValueError) as e:
            raise config_key_error(cfg, e, where=config_file) from None
        cfg.TEACHER.set_new_allowed(True)
    merge_kd_opts(cfg, opts)
    if cfg.TEACHER.CONFIG_FILE:
        cfg.TEACHER.CONFIG_FILE = resolve_teacher_config_file(cfg.TEACHER.CONFIG_FILE, [p for p, _ in chain])
    check_kd_cfg(cfg, kd_type_set=_raw_value(chain_dicts, ("KD", "TYPE"), opts) is not None)
    if freeze:
        cfg.freeze()
    return cfg


def check_kd_cfg(cfg: CN, kd_type_set: bool = False) -> None:
    """Validate the KD keys (method names, KD.TYPE against KD.METHODS) and the derived teacher config."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if kd_type_set and arch != "RCNNKD" and list(cfg.KD.METHODS):
        raise ConfigError(f"KD.TYPE {cfg.KD.TYPE!r} and KD.METHODS {list(cfg.KD.METHODS)} are both set; KD.TYPE is "
                          "mdistiller's and is read only with MODEL.META_ARCHITECTURE RCNNKD: keep one of them")
    if kd_method_names(cfg):
        build_teacher_cfg(cfg)
