"""Parameter sensitivity and contribution balance: the paper's analysis (§2, §5), as a tool.

The sensitivity of a parameter is |θ ⊙ ∇θ L| (the paper's Eq. 2): the first-order change of the
loss if the parameter were zeroed. Intra-distillation aims at *balanced* contributions: a small
standard deviation of all sensitivities (the paper removes the top 1% first, Appendix B), a small
gap between the top 20% and the rest during training (Fig. 2), and a smaller loss increase when
the least sensitive parameters are pruned (Fig. 6).

    measure.py   parameter_sensitivity: |θ ⊙ ∇θ L| averaged over batches
    balance.py   contribution_balance: the statistics of a sensitivity distribution
    tracker.py   SensitivityTracker: the Fig. 2 numbers during training
    pruning.py   prune_by_sensitivity, pruning_curve: one-shot pruning (Fig. 6)
    plots.py     the paper's figures as PNG files (matplotlib, imported when used)
    cli.py       `intradistill-sensitivity` / `python -m intradistill_kernels.sensitivity`

See docs/sensitivity.md.
"""

from .balance import TOP_FRACTION, ContributionBalance, contribution_balance
from .cli import main
from .measure import Sensitivity, parameter_sensitivity
from .plots import plot_pruning_curves, plot_sensitivity_violins, plot_top_vs_rest
from .pruning import PruneHandle, prune_by_sensitivity, pruning_curve
from .tracker import SensitivityTracker

__all__ = [
    "Sensitivity", "TOP_FRACTION", "parameter_sensitivity", "ContributionBalance", "contribution_balance",
    "SensitivityTracker", "PruneHandle", "prune_by_sensitivity", "pruning_curve",
    "plot_sensitivity_violins", "plot_top_vs_rest", "plot_pruning_curves", "main",
]
