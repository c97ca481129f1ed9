"""Losses: swapped prediction (MIRA Eq. 8); alpha-CPC and alpha-ML-CPC bounds (Song & Ermon Eq. 4, 6)."""

from fastssl.losses.cpc import BOUNDS, alpha_min, cpc_bound, ml_cpc_bound
from fastssl.losses.swapped import swapped_prediction_loss

__all__ = ["BOUNDS", "alpha_min", "cpc_bound", "ml_cpc_bound", "swapped_prediction_loss"]
