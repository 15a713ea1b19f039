"""The model `tlray predict` scores with: a logged tlray image classifier, found through MLflow
(`models:/NAME@champion`, `models:/NAME/VERSION`, `models:/m-ID`, `runs:/RUN_ID/model`, a local
model directory; a bare registered name means `models:/NAME@champion`), checked before any
work starts, and explained when it is not there (what the store holds instead)."""

from __future__ import annotations

import os
from pathlib import Path

from tlray.errors import TlrayError

MODEL_URI_HELP = ("models:/NAME@ALIAS (e.g. models:/NAME@champion), models:/NAME/VERSION, "
                  "models:/m-ID, runs:/RUN_ID/model, a local model directory, or a bare "
                  "registered model NAME (= models:/NAME@champion)")


def normalise_uri(model_uri: str) -> str:
    """A bare registered model name means its champion; URIs and paths pass unchanged."""
    model_uri = str(model_uri).strip()
    if not model_uri:
        raise TlrayError(f"model URI is empty: expected {MODEL_URI_HELP}")
    if (":" not in model_uri and "/" not in model_uri and os.sep not in model_uri
            and not Path(model_uri).exists()):
        from tlray.track.registry import CHAMPION_ALIAS

        return f"models:/{model_uri}@{CHAMPION_ALIAS}"
    return model_uri


def model_info(model_uri: str):
    """mlflow's ModelInfo for `model_uri`, or a TlrayError that says what exists instead."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tlray.track import store as tracking

    tracking.configure()
    try:
        return mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError) as e:
        raise TlrayError(_explain_missing_model(model_uri, e)) from None


def _parse_models_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS -> (NAME, "alias", ALIAS); models:/NAME/V -> (NAME, "version", V);
    models:/m-ID -> (m-ID, "logged", None)."""
    rest = model_uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, "alias", alias
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, "version", version
    return rest, ("logged" if rest.startswith("m-") else None), None


def _explain_missing_model(model_uri: str, error: Exception) -> str:
    """Names the URI and what the store does hold: aliases, versions, models, runs."""
    from mlflow import MlflowClient

    from tlray.track import store as tracking

    store = f"tracking store {tracking.tracking_uri()}"
    client = MlflowClient()
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    try:
        if model_uri.startswith("models:/"):
            name, kind, ref = _parse_models_uri(model_uri)
            if kind == "logged":
                return (f"model {model_uri}: no logged model with id {name!r} in the {store} "
                        f"({reason})")
            registered = _registered_model(client, name)
            if registered is None:
                names = [m.name for m in client.search_registered_models(max_results=20)]
                have = (f"registered models there: {', '.join(sorted(names))}" if names
                        else "it has no registered models")
                return (f"model {model_uri}: there is no registered model named {name!r} in the "
                        f"{store} ({have}); check MLFLOW_TRACKING_URI / TLRAY_HOME")
            versions = sorted((int(v.version) for v in
                               client.search_model_versions(f"name = '{_quote(name)}'")))
            aliases = ", ".join(f"@{a} -> version {v}" for a, v in
                                sorted(registered.aliases.items())) or "none"
            listing = (f"its aliases: {aliases}; its versions: "
                       f"{', '.join(map(str, versions)) or 'none'}")
            if kind == "alias":
                return f"model {model_uri}: registered model {name!r} has no alias {ref!r} ({listing})"
            if kind == "version":
                return (f"model {model_uri}: registered model {name!r} has no version {ref!r} "
                        f"({listing})")
            return (f"model {model_uri}: expected models:/{name}@ALIAS or "
                    f"models:/{name}/VERSION ({listing})")
        if model_uri.startswith("runs:/"):
            run_id, _, artifact = model_uri[len("runs:/"):].strip("/").partition("/")
            try:
                run = client.get_run(run_id)
            except Exception:
                return f"model {model_uri}: run {run_id!r} does not exist in the {store}"
            names = _run_model_names(run)
            have = (f"its logged models: {', '.join(names)}" if names
                    else "it has no logged models")
            return (f"model {model_uri}: run {run_id} has no model at {artifact or '(empty)'!r} "
                    f"({have}; use runs:/{run_id}/<model name>)")
    except Exception as lookup_error:  # explaining must never hide the original problem
        return f"model {model_uri}: {reason} (and looking up what exists failed: {lookup_error})"
    return (f"model {model_uri}: no MLflow model there ({reason}); expected {MODEL_URI_HELP} "
            f"(using the {store})")


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        return None


def _run_model_names(run) -> list[str]:
    import mlflow

    try:
        models = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")
        return sorted({m.name for m in models})
    except Exception:
        return []


def describe_model(model_uri: str) -> str:
    """The URI, plus the version an alias points to (the alias may move later)."""
    if not model_uri.startswith("models:/"):
        return model_uri
    name, kind, ref = _parse_models_uri(model_uri)
    if kind != "alias":
        return model_uri
    try:
        from mlflow import MlflowClient

        return f"{model_uri} (version {MlflowClient().get_model_version_by_alias(name, ref).version})"
    except Exception:
        return model_uri


def check_image_model(info, model_uri: str) -> list[str]:
    """The class names of a model that takes raw images (one tlray logged), or an error that
    says what the model is instead."""
    metadata = info.metadata or {}
    names = metadata.get("class_names")
    loader = ((info.flavors or {}).get("python_function") or {}).get("loader_module")
    if not isinstance(names, list) or not names or loader != "mlflow.pyfunc.loaders.code_model":
        raise TlrayError(
            f"model {model_uri} is not a tlray image classifier (flavors: "
            f"{', '.join(info.flavors or {}) or 'none'}; "
            f"{'no class_names metadata' if not names else 'its pyfunc takes tensors'}): "
            f"tlray predicts with models that take raw images, as tlray's training logs "
            f"them; a model logged by an older tlray needs retraining (or "
            f"`tlray train --model.weights={model_uri}` to start from it)")
    return [str(n) for n in names]


def load_model(resolved_uri: str, model_uri: str, device: str = "cpu", *,
               quiet: bool = False):
    """The model's pyfunc, its network on `device` ("cpu" or "cuda"). `quiet` skips MLflow's
    check of the model's pip requirements against this environment (~1.5 s, and a warning
    a person needs once, not from every replica)."""
    import mlflow.pyfunc

    try:
        model = mlflow.pyfunc.load_model(
            resolved_uri, model_config={"device": device} if device != "cpu" else None,
            suppress_warnings=quiet)
    except Exception as e:
        raise TlrayError(f"model {model_uri} exists but could not be loaded ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if (model.model_config or {}).get("device", "cpu") != device:
        raise TlrayError(f"model {model_uri} runs on the CPU only (an older tlray logged it "
                         f"without a device setting): retrain it to predict on a GPU, or "
                         f"predict without --gpu")
    return model
