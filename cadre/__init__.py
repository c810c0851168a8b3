"""cadre: hand a training script to a GPU cluster, Azure ML Estimator style.

>>> from cadre import Workspace, Experiment, Estimator
>>> ws = Workspace.from_config()  # doctest: +SKIP
"""

from cadre._compat import AmlCompute, ComputeTarget, Datastore, PyTorch, SKLearn, TensorFlow
from cadre._config import (
    CondaDependencies,
    ContainerRegistry,
    DockerSection,
    Environment,
    PythonSection,
    RunConfiguration,
    ScriptRunConfig,
)
from cadre._dataset import Dataset, DatasetConsumptionConfig
from cadre._estimator import Estimator, MpiConfiguration, PyTorchConfiguration, TensorflowConfiguration
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
    "AmlCompute",
    "CadreError",
    "ClusterNotRunningError",
    "ComputeTarget",
    "CondaDependencies",
    "ConflictError",
    "ContainerRegistry",
    "Dataset",
    "DatasetConsumptionConfig",
    "Datastore",
    "DockerSection",
    "Environment",
    "Estimator",
    "Experiment",
    "Model",
    "MpiConfiguration",
    "NotFoundError",
    "NotSupportedError",
    "PyTorch",
    "PyTorchConfiguration",
    "PythonSection",
    "Run",
    "RunConfiguration",
    "RunFailedError",
    "RunState",
    "SKLearn",
    "ScriptRunConfig",
    "ServiceUnavailableError",
    "TensorFlow",
    "TensorflowConfiguration",
    "ValidationError",
    "Workspace",
]
