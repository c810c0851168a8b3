"""cadre: hand a training script to a GPU cluster, Azure ML Estimator style.

>>> from cadre import Workspace, Experiment, Estimator
>>> ws = Workspace.from_config()  # doctest: +SKIP
"""

from cadre._dataset import Dataset, DatasetConsumptionConfig
from cadre._estimator import Estimator, MpiConfiguration, PyTorchConfiguration
from cadre._model import Model
from cadre._run import Experiment, Run
from cadre._workspace import Workspace
from shared.errors import (
    CadreError,
    ClusterNotRunningError,
    ConflictError,
    NotFoundError,
    NotSupportedError,
    RunFailedError,
    ServiceUnavailableError,
    ValidationError,
)
from shared.states import RunState

__all__ = [
    "CadreError",
    "ClusterNotRunningError",
    "ConflictError",
    "Dataset",
    "DatasetConsumptionConfig",
    "Estimator",
    "Experiment",
    "Model",
    "MpiConfiguration",
    "NotFoundError",
    "NotSupportedError",
    "PyTorchConfiguration",
    "Run",
    "RunFailedError",
    "RunState",
    "ServiceUnavailableError",
    "ValidationError",
    "Workspace",
]
