"""Losses: swapped prediction (MIRA Eq. 8)."""

from fastssl.losses.swapped import cross_entropy, swapped_prediction_loss

__all__ = ["cross_entropy", "swapped_prediction_loss"]
