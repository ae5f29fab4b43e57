"""posttrain losses: pure functions of tensors, one file per family, torch only.

Each file stands on its own apart from at most one tiny helper from common.py (masked_mean or IGNORE_INDEX);
copy a function out together with that helper. The names, argument order and return shapes of the functions
exported here are stable: new options arrive as keyword arguments with defaults.
"""

from .advantages import (gae, group_advantages, outcome_process_advantages, overlong_penalty, process_advantages,
                         rloo_advantages)
from .common import IGNORE_INDEX, gather_logprobs, masked_mean, token_logprobs
from .distill import generalized_jsd_loss, kl_distill_loss, token_reverse_kl_pg_loss
from .dpo import dpo_loss, kto_loss, orpo_loss, reward_model_loss, simpo_loss
from .policy import (aggregate_loss, cispo_loss, entropy_from_logits, gspo_loss, kl_penalty, policy_loss,
                     tis_weights, value_loss)
from .prm import prm_loss
from .sft import sft_loss

__all__ = [
    "IGNORE_INDEX",
    "aggregate_loss",
    "cispo_loss",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "gather_logprobs",
    "generalized_jsd_loss",
    "group_advantages",
    "gspo_loss",
    "kl_distill_loss",
    "kl_penalty",
    "kto_loss",
    "masked_mean",
    "orpo_loss",
    "outcome_process_advantages",
    "overlong_penalty",
    "policy_loss",
    "prm_loss",
    "process_advantages",
    "reward_model_loss",
    "rloo_advantages",
    "sft_loss",
    "simpo_loss",
    "tis_weights",
    "token_logprobs",
    "token_reverse_kl_pg_loss",
    "value_loss",
]
