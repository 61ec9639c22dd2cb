"""The trained model as an MLflow pyfunc model, loadable with ``mlflow.pyfunc.load_model`` and servable with
``mlflow models serve``.

The MLflow model carries the whole model folder (:mod:`eimf.serving.folder`) as its one artifact, and the
``eimf`` package as code, so it loads with the data and run folders gone and on a machine without eimf
installed (the pip requirements list the rest). Input: a DataFrame, one row per user, with ``history`` (a list of
raw item ids as strings) and optional ``k`` and ``exclude_seen``; each row is validated by
:class:`eimf.serving.schema.RecommendRequest`. Output: a DataFrame with one row per user and the fields of
:class:`eimf.serving.schema.RecommendResponse`. A bad row raises an ``MlflowException`` (HTTP 400 when served)
that names the row and the field.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Array, ColSpec, DataType, Schema

import eimf
from eimf import fs, tracking
from eimf.formats.model_folder import ITEMS, MANIFEST
from eimf.serving.recommender import Recommender
from eimf.serving.schema import RecommendRequest, RecommendResponse, RequestError

log = logging.getLogger(__name__)

ARTIFACT = "model_folder"
#: Name of the MLflow model inside a run.
MODEL_NAME = "recommender"
#: Packages the model needs besides eimf's own code (shipped as code_paths); pinned to what is installed.
REQUIREMENTS = ("torch", "faiss-cpu", "numpy", "pandas", "pyarrow", "omegaconf", "PyYAML", "mlflow", "scipy")


class EIMFRecommenderModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.recommender = Recommender.load(context.artifacts[ARTIFACT])

    # A DataFrame hint: MLflow infers no schema from it (the signature is declared in signature()) and stops
    # warning, at every import of this module, that predict has no type hints.
    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict] = None):
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "history" not in frame.columns:
            raise MlflowException(f"the input needs a 'history' column (got {list(frame.columns)})",
                                  INVALID_PARAMETER_VALUE)
        # MLflow's signature check has already dropped undeclared columns; a direct predict() is checked in full
        rows = frame.to_dict("records")
        try:
            return pd.DataFrame(self.recommender.recommend(rows))
        except RequestError as e:
            raise MlflowException(str(e), INVALID_PARAMETER_VALUE) from None


def signature() -> ModelSignature:
    """The pyfunc model's MLflow signature, derived from :mod:`eimf.serving.schema` so that the contract has one
    source.

    MLflow checks it before the model sees a request, with its own rules: a batch where only some rows give ``k``
    is a float column, which it refuses for ``long`` (``double`` would refuse every integer ``k`` instead).
    """
    request_types = {"history": Array(DataType.string), "k": DataType.long, "exclude_seen": DataType.boolean}
    answer_types = {"items": Array(DataType.string), "scores": Array(DataType.double),
                    "interests": Array(DataType.long), "titles": Array(DataType.string),
                    "interest_labels": Array(DataType.string), "unknown_ids": DataType.long,
                    "history_used": DataType.long}
    if set(request_types) != set(RecommendRequest.model_fields) or \
            set(answer_types) != set(RecommendResponse.model_fields):
        raise AssertionError("signature() is out of step with RecommendRequest / RecommendResponse")
    inputs = Schema([ColSpec(request_types[name], name, required=field.is_required())
                     for name, field in RecommendRequest.model_fields.items()])
    outputs = Schema([ColSpec(answer_types[name], name) for name in RecommendResponse.model_fields])
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list:
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def log_recommender(model_folder: str, tracking_uri: str, run_id: str, registered_model: Optional[str] = None) -> str:
    """Log ``model_folder`` (local or ``s3://``) as the pyfunc model ``recommender`` of run ``run_id``, registered as
    ``registered_model`` unless that is empty. Returns the model URI (``models:/name/version`` when registered)."""

    with tracking.fluent_tracking_uri(tracking_uri), fs.local_dir(str(model_folder)) as local, \
            tempfile.TemporaryDirectory(prefix="eimf-code-") as code:
        # the input example is checked at logging time: the model must answer it, or logging fails
        example = pd.DataFrame({"history": [pd.read_parquet(Path(local) / ITEMS)["raw_id"].head(5).tolist()],
                                "k": [10]})
        # the package's sources only: compiled caches are the logging machine's, not the model's
        package = shutil.copytree(Path(eimf.__file__).parent, Path(code) / "eimf",
                                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=EIMFRecommenderModel(), artifacts={ARTIFACT: local},
                code_paths=[str(package)], signature=signature(),
                input_example=example, pip_requirements=requirements(),
                registered_model_name=registered_model or None)
    if registered_model and info.registered_model_version is not None:
        return f"models:/{registered_model}/{info.registered_model_version}"
    return info.model_uri


def load_recommender(uri_or_folder: str):
    """A :class:`~eimf.serving.recommender.Recommender` from a model folder (local or ``s3://``) or an MLflow model
    URI (``models:/eimf-ml-1m/3``, ``runs:/<id>/recommender``, a local pyfunc folder)."""

    if fs.exists(fs.join(str(uri_or_folder), MANIFEST)):
        return Recommender.load(str(uri_or_folder))
    return mlflow.pyfunc.load_model(str(uri_or_folder)).unwrap_python_model().recommender
