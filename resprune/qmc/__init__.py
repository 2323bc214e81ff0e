"""Quasi-Monte Carlo training points for DNN surrogates of PDE data-to-observable maps.

A self-contained wing of resprune (it imports nothing from the rest of the package):

* :mod:`resprune.qmc.points`    Monte Carlo, Sobol' and order-2 interlaced Sobol' point sets;
* :mod:`resprune.qmc.problems`  parametric maps ``y -> G(y)`` (smooth function, elliptic and
  parabolic PDEs with affine uncertain coefficients);
* :mod:`resprune.qmc.surrogate` MLP surrogates trained full batch (Adam, then L-BFGS);
* :mod:`resprune.qmc.study`     error-versus-N study, fitted rates, markdown and PNG report;
* :mod:`resprune.qmc.ensemble`  the published study's grid of small MLPs, trained batched;
* :mod:`resprune.qmc.reference` the published protocol (E_G, E_T, gap, bootstrap CIs), MC beside QMC;
* :mod:`resprune.qmc.cli`       ``resprune qmc study`` / ``python -m resprune.qmc study``.

Example:
    >>> from resprune.qmc import PointSetConfig, generate_points, create_problem
    >>> y = generate_points(PointSetConfig("interlaced2-scrambled", dim=50), 64)
    >>> create_problem("smooth50")(y).shape
    (64,)
"""

from resprune.qmc.ensemble import GridConfig
from resprune.qmc.points import PointSetConfig, generate_points, list_point_sets, nested_pair
from resprune.qmc.problems import create_problem, list_problems
from resprune.qmc.reference import ReferenceConfig, run_reference
from resprune.qmc.surrogate import SurrogateConfig, train_ensemble, train_surrogate

__all__ = [
    "PointSetConfig",
    "generate_points",
    "list_point_sets",
    "nested_pair",
    "create_problem",
    "list_problems",
    "SurrogateConfig",
    "train_surrogate",
    "train_ensemble",
    "GridConfig",
    "ReferenceConfig",
    "run_reference",
]
