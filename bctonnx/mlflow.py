"""``bctonnx.mlflow``: the MLflow integration under a short name (`bctonnx.integrations.mlflow`:
``save_model``, ``log_model``); importing it gives that very module."""

import sys

from .integrations import mlflow

sys.modules[__name__] = mlflow
