"""The MLflow model registry as the retraining loop reads and writes it: model sources, aliases, versions.

A model source (``pipeline.from_model``, the promotion gate's champion) is a model folder (local or ``s3://``) or a
registered version, ``models:/<name>/<version>`` or ``models:/<name>@<alias>``. :func:`resolve_source` pins it when
a pipeline is planned (an alias becomes the version it points at now, a folder its manifest's hash), so that a
moved alias or a rewritten folder is a new fingerprint, and :func:`local_model_folder` makes a pinned source a local
model folder (a registered version's ``model_folder`` artifact, downloaded). Aliases, not stages, mark the versions
(MLflow's convention since 2.9): ``champion`` is served, ``challenger`` lost the last comparison.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from typing import Iterator, Optional, Tuple

from mlflow.exceptions import MlflowException

from eimf import fs, tracking
from eimf.config import ConfigError
from eimf.config.run import MODEL_URI
from eimf.formats.model_folder import MANIFEST, WEIGHTS

CHAMPION = "champion"
CHALLENGER = "challenger"


def parse_model_uri(uri: str) -> Optional[Tuple[str, Optional[str], Optional[str]]]:
    """``(name, version, alias)`` of a registered-model URI (one of version and alias is None), else None."""
    m = MODEL_URI.fullmatch(str(uri).strip())
    return (m.group("name"), m.group("version"), m.group("alias")) if m else None


def version_uri(name: str, version) -> str:
    return f"models:/{name}/{version}"


def version_by_alias(tracking_uri: str, name: str, alias: str):
    """The ``ModelVersion`` an alias points at, or None where the model or the alias does not exist."""
    try:
        return tracking.client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def resolve_source(source: str, tracking_uri: str, where: str = "pipeline.from_model") -> dict:
    """A model source pinned: ``{"uri": what to read, ...}``. A registered model: its version (an alias resolved
    now) and the run that logged it; a folder: its path and the SHA-256 of its manifest and weights' size and
    time. A source that is not there is a :class:`ConfigError` naming ``where``."""
    parsed = parse_model_uri(source)
    if parsed is None:
        manifest = fs.join(str(source), MANIFEST)
        if not fs.exists(manifest):
            raise ConfigError(f"{where}={source}: not a model folder (no {MANIFEST}) nor models:/<name>@<alias> | "
                              f"models:/<name>/<version>")
        weights = fs.join(str(source), WEIGHTS)
        info = fs.file_info(weights) if fs.exists(weights) else {}
        return {"uri": str(source), "folder_sha256": hashlib.sha256(fs.read_bytes(manifest)).hexdigest(),
                "weights": {k: info.get(k) for k in ("size", "mtime", "etag") if info.get(k) is not None}}
    name, version, alias = parsed
    client = tracking.client(tracking_uri)
    try:
        mv = version_by_alias(tracking_uri, name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as e:
        raise ConfigError(f"{where}={source}: no such model version in {tracking_uri} ({e.message})") from None
    if mv is None:
        raise ConfigError(f"{where}={source}: registered model {name!r} has no alias {alias!r} in {tracking_uri}")
    out = {"uri": version_uri(name, mv.version), "name": name, "version": str(mv.version), "run_id": mv.run_id}
    if alias:
        out["alias"] = alias
    return out


@contextlib.contextmanager
def local_model_folder(source: str, tracking_uri: str) -> Iterator[str]:
    """A model folder for ``source``: the folder itself (local or ``s3://``), or a registered version's folder (the
    pyfunc model's ``model_folder`` artifact) downloaded to a temporary folder, removed on exit."""
    parsed = parse_model_uri(source)
    if parsed is None:
        yield str(source)
        return
    import mlflow.artifacts  # the download client; mlflow is imported by eimf.tracking already

    name, version, alias = parsed
    client = tracking.client(tracking_uri)
    if alias:
        version = client.get_model_version_by_alias(name, alias).version
    # where the version's files are, asked of this registry: MLflow's own models:/ download asks the process-wide
    # registry URI instead
    where = client.get_model_version_download_uri(name, str(version))
    if where.startswith("models:/"):  # a logged model (MLflow 3): its artifact location
        where = client.get_logged_model(where[len("models:/"):].strip("/")).artifact_location
    with tempfile.TemporaryDirectory(prefix="eimf-source-model-") as tmp:
        got = mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=tmp, tracking_uri=tracking_uri)
        found = [root for root, _, files in os.walk(got) if MANIFEST in files]
        if not found:
            raise ConfigError(f"{source}: the registered model holds no eimf model folder ({MANIFEST})")
        yield min(found, key=len)


def set_alias(tracking_uri: str, name: str, alias: str, version) -> None:
    tracking.client(tracking_uri).set_registered_model_alias(name, alias, str(version))


__all__ = ["CHALLENGER", "CHAMPION", "local_model_folder", "parse_model_uri", "resolve_source", "set_alias",
           "version_by_alias", "version_uri"]
