"""timm's own pretrained weights from the Hugging Face hub: the local cache first, and an error
in seconds (not minutes of retries) when the hub cannot be reached."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm

from tlray.errors import TlrayError

HUB_CONNECT_TIMEOUT_S = 3.0

_OFFLINE_HINT = (
    "To run offline use --weights packaged (tf_efficientnet_lite0 only), --weights file:PATH "
    "(a state dict in timm layout), --weights models:/NAME@ALIAS (a model logged to MLflow "
    "earlier), or pre-populate the Hugging Face cache on a machine with network "
    "(`hf download {repo}`) and copy it to HF_HUB_CACHE here."
)


def hub_overlay(backbone: str) -> dict[str, Any] | None:
    """Use a locally cached hub file if there is one, else make sure the hub answers."""
    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise TlrayError(
            f"weights 'timm': timm has no pretrained weights for {backbone}; use --weights none, "
            "file:PATH or an MLflow model URI"
        )
    cached = hub_cached_file(backbone)
    if cached is not None:
        # Reading the cached file directly never touches the network, even without
        # HF_HUB_OFFLINE=1, which would otherwise spend ~46 s retrying an unreachable hub.
        return {"file": str(cached), "custom_load": bool(cfg.custom_load)}
    check_hub_reachable(backbone)
    return None


def hub_cached_file(backbone: str) -> Path | None:
    """The backbone's timm weights in the local Hugging Face cache, or None.

    Mirrors what timm asks the hub for: ``hf_hub_filename`` if the config names one, else
    ``model.safetensors`` and then ``pytorch_model.bin`` (``timm.models._hub``).
    """
    from huggingface_hub import try_to_load_from_cache
    from timm.models._hub import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, hf_split

    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo_id, revision = hf_split(cfg.hf_hub_id)
    names = [cfg.hf_hub_filename or HF_SAFE_WEIGHTS_NAME]
    if not cfg.hf_hub_filename:
        names.append(HF_WEIGHTS_NAME)
    for name in names:
        found = try_to_load_from_cache(repo_id, name, revision=revision)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def check_hub_reachable(backbone: str, timeout: float = HUB_CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, not minutes, when timm's weights cannot be downloaded.

    Honours ``HF_HUB_OFFLINE`` (an immediate error) and ``HF_ENDPOINT``; otherwise opens one TCP
    connection to the hub (or to the HTTPS proxy, when one is configured).
    """
    from huggingface_hub import constants

    cfg = timm.models.get_pretrained_cfg(backbone)
    repo = (cfg.hf_hub_id if cfg is not None else None) or f"timm/{backbone}"
    hint = _OFFLINE_HINT.format(repo=repo)
    # The environment, not huggingface_hub.constants: those are frozen when first imported.
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        raise TlrayError(
            f"weights 'timm': HF_HUB_OFFLINE is set and {backbone}'s weights ({repo}) are not in "
            f"the local Hugging Face cache ({constants.HF_HUB_CACHE}). {hint}"
        )
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if cfg is not None and not cfg.hf_hub_id and cfg.url:
        endpoint = cfg.url
    host, port = _connect_target(endpoint)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise TlrayError(
            f"weights 'timm': cannot reach the Hugging Face hub ({host}:{port}: {e}) to download "
            f"{backbone}'s weights, and they are not in the local cache "
            f"({constants.HF_HUB_CACHE}). {hint}"
        ) from e


def _connect_target(url: str) -> tuple[str, int]:
    """The host and port a download of ``url`` would connect to first (proxy included)."""
    parsed = urlparse(url)
    proxy_var = "HTTPS_PROXY" if parsed.scheme == "https" else "HTTP_PROXY"
    proxy = os.environ.get(proxy_var) or os.environ.get(proxy_var.lower())
    if proxy and not _no_proxy(parsed.hostname or ""):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    default_port = 443 if parsed.scheme == "https" else 80
    return parsed.hostname or "", parsed.port or default_port


def _no_proxy(host: str) -> bool:
    entries = (os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "").split(",")
    return any(e.strip() and host.endswith(e.strip().lstrip("*")) for e in entries)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
