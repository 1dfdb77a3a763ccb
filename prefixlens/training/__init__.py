"""Training: prefix-tuning (every form), prompt tuning, LoRA and full fine-tuning.

Layout (one job per module):

=====================  ==========================================================================
``config``             :class:`TrainConfig` (hyperparameters, validated) and :class:`TrainResult`
``state``              what a call hands back as it found it (flags, modes, grads, the global RNG)
``loss``               :func:`lm_loss`, :func:`batch_loss` (toy-task batches, shared pads)
``evaluation``         :func:`predict`, :func:`evaluate`, :class:`Accuracy`, ... on the toy tasks
``checkpoints``        run identity and exactly-resuming, atomic checkpoints (optimiser ``state_dict``)
``trainer``            the loop (:func:`train_loop`, :func:`fit`) and one step (:func:`train_step`)
``methods``            :func:`train_model`, :func:`train_prefix`, :func:`train_lora` on the toy tasks
``reparametrisation``  Li & Liang's MLP reparametrisation (:class:`PrefixMLP`)
``pairs``              :func:`train_on_pairs`: your own ``(input, target)`` data, every method
``fast_kv``            a KV prefix as the HF key/value cache (no placeholder slots: PEFT's route)
=====================  ==========================================================================

``prefixlens.train`` re-exports all of it (the older, single-module spelling).
"""

from prefixlens.training.checkpoints import fingerprint, run_id
from prefixlens.training.config import TrainConfig, TrainResult
from prefixlens.training.evaluation import Accuracy, accuracy_matrix, evaluate, position_accuracy, predict
from prefixlens.training.loss import batch_loss, lm_loss
from prefixlens.training.methods import (
    PREFIX_FORMS,
    prefix_parameter_count,
    train_lora,
    train_model,
    train_prefix,
    train_prefix_on_task,
)
from prefixlens.training.pairs import Pairs, Trained, train_on_pairs  # noqa: E402
from prefixlens.training.reparametrisation import PrefixMLP
from prefixlens.training.state import count_trainable, freeze
from prefixlens.training.trainer import fit, train_loop, train_step

__all__ = [
    "TrainConfig", "TrainResult", "Accuracy", "PrefixMLP", "PREFIX_FORMS",
    "lm_loss", "batch_loss", "fit", "train_loop", "train_step",
    "train_model", "train_prefix", "train_prefix_on_task", "train_lora", "train_on_pairs", "Pairs", "Trained",
    "predict", "evaluate", "position_accuracy", "accuracy_matrix",
    "count_trainable", "prefix_parameter_count", "freeze", "fingerprint", "run_id",
]
