"""Pure tensor ops of the method: the pseudo-label assignments (no model, no engine imports).

- :func:`mira_assign`: MIRA's mutual-information-regularised assignment (Eq. 5-7).
- :func:`sinkhorn_assign`: SwAV's Sinkhorn-Knopp equipartition baseline.
- :func:`mira_assign_views`: MIRA for all teacher views with one all-gather per step, behind
  the `fastssl::mira_assign_views` custom op (traceable by torch.compile).
- `mira.mira_fixed_point`: the one log-space iteration (Eq. 5-7) that both MIRA ops run.
- :func:`pseudo_label_mi`: the mutual information of pseudo-labels (Eq. 2), a collapse monitor.

Both are reference implementations in log space over the global batch (``group``); fused
kernels behind the same signatures are held to them.
"""

from .mira import mira_assign, pseudo_label_mi
from .mira_fused import mira_assign_views
from .sinkhorn import sinkhorn_assign

__all__ = ["mira_assign", "mira_assign_views", "pseudo_label_mi", "sinkhorn_assign"]
