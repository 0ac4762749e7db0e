"""Numerical constants of the operator, shared by every backend (the reference states its own;
a test checks they agree)."""

EPS = 1e-5  # rho_n = ||x_n|| + EPS
# A part is degenerate (uniform map) when |S_k| <= DEGENERATE_SUM_RATIO * sum_n |sim_kn|.
DEGENERATE_SUM_RATIO = 1e-4
