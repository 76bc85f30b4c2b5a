"""Weight decay ⇄ learning rate tools (Hoffer et al. 2018, sec. 3; van Laarhoven 2017).

For a weight followed by normalization the loss depends only on each output channel's direction, so weight
decay acts only by shrinking the norm, which raises the effective step size η/‖w‖². These tools find such
weights, watch their effective step, and reproduce weight decay without it.
"""

from .effective_step import effective_step, norm_power
from .equilibrium import equilibrium_angular_update, equilibrium_norm
from .mimic import MIMIC_RULES, WeightDecayMimic
from .monitor import EffectiveLRMonitor
from .scale_invariance import gradient_scale_invariant, scale_invariant_parameters
from .schedule import NormSchedule
from .step_log import ChannelStepLog, angular_update_ratio, effective_step_ratio
from .trajectory import NormTrajectory, channel_norms

__all__ = ["scale_invariant_parameters", "gradient_scale_invariant", "EffectiveLRMonitor", "NormTrajectory",
           "channel_norms", "WeightDecayMimic", "MIMIC_RULES", "NormSchedule", "effective_step", "norm_power",
           "ChannelStepLog", "effective_step_ratio", "angular_update_ratio", "equilibrium_angular_update",
           "equilibrium_norm"]
