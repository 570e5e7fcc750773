"""Knowledge distillation (SPEC D1-D4). Importing this package registers ``distill: {method: kd |
feature_kd}``."""

from netpress.distill.augment import AugmentConfig, augment_batch, augmented_ce, mixed_ce
from netpress.distill.ensemble import Ensemble
from netpress.distill.features import FeatureTaps, build_adapters, hint_loss
from netpress.distill.kd import DistillConfig, distill, distill_stage
from netpress.distill.losses import embedding_loss, kd_kl, kd_loss, soft_target_ce
from netpress.distill.student import DeriveConfig, StudentConfig, derive_student

__all__ = ["AugmentConfig", "augment_batch", "augmented_ce", "mixed_ce",
           "DeriveConfig", "DistillConfig", "Ensemble", "FeatureTaps", "StudentConfig", "build_adapters",
           "derive_student", "distill", "distill_stage", "embedding_loss", "hint_loss", "kd_kl",
           "kd_loss", "soft_target_ce"]
