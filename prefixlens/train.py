"""Training, in one namespace: a re-export of :mod:`prefixlens.training` (kept so that
``from prefixlens import train`` and ``train.train_prefix(...)`` go on working).

The code lives in the package, one job per module: ``config`` (:class:`TrainConfig`,
:class:`TrainResult`), ``loss`` (:func:`batch_loss`), ``evaluation``, ``checkpoints``, ``trainer``
(the loop), ``methods`` (:func:`train_model`, :func:`train_prefix`, :func:`train_lora`),
``reparametrisation`` (:class:`PrefixMLP`), ``pairs`` (training on your own ``(input, target)``
data) and ``fast_kv`` (a KV prefix as the key/value cache). The private names below are the ones
earlier code and tests reach for.
"""

from __future__ import annotations

from prefixlens.lora import LoRA, add_lora  # noqa: F401
from prefixlens.prefixes import KVPrefix, Prefix, ResidualPrefix, SoftPrompt  # noqa: F401
from prefixlens.training import *  # noqa: F401,F403
from prefixlens.training import __all__ as _training_all
from prefixlens.training.checkpoints import checkpoint_dir as _ckpt_dir  # noqa: F401
from prefixlens.training.checkpoints import fingerprint as _fingerprint  # noqa: F401
from prefixlens.training.checkpoints import run_id as _run_id  # noqa: F401
from prefixlens.training.evaluation import validation_batch as _validation  # noqa: F401
from prefixlens.training.loss import can_share_pads as _can_share_pads  # noqa: F401
from prefixlens.training.loss import content as _content  # noqa: F401
from prefixlens.training.loss import dropout_active as _dropout_active  # noqa: F401
from prefixlens.training.loss import logits_of as _logits  # noqa: F401
from prefixlens.training.loss import logits_shared_pads as _logits_shared_pads  # noqa: F401
from prefixlens.training.state import ModelState as _ModelState  # noqa: F401
from prefixlens.training.state import keeps_global_rng as _keeps_global_rng  # noqa: F401
from prefixlens.training.state import restores_model_state as _restores_model_state  # noqa: F401
from prefixlens.training.state import rng_devices as _rng_devices  # noqa: F401

__all__ = list(_training_all)
