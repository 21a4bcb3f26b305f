"""Where published weights come from, and fetching them only when that can work.

timm fetches published weights from the Hugging Face Hub (``huggingface_hub``), torchvision and
a few timm models from a URL (``torch.hub``). Offline, the hub retries each file with back-off
for about 25 s before giving up. `published_weights` probes the weights' host once, with a
short timeout (`PROBE_TIMEOUT`), before anything is fetched: reachable, the libraries run as
usual; unreachable (or ``HF_HUB_OFFLINE=1``), the hub runs in its offline mode, which reads its
local cache and fails at once, and a torch.hub file must already be in torch's cache. Weights
in the local caches therefore load offline too (docs/design.md section 5).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from mcn_compress.errors import ModelLoadError, WeightsUnavailable
from mcn_compress.info import ModelSource

_logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 3.0  # seconds for one TCP connection to the weights' host (DNS included)
HUB_PREFIXES = ("hf-hub:", "hf_hub:")


def hub_host() -> str:
    """The Hugging Face Hub's host (``HF_ENDPOINT`` when set)."""
    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def weights_url(source: ModelSource) -> str | None:
    """The URL torch.hub downloads ``source``'s published weights from; None when they come
    from the Hugging Face Hub (or ``source`` has none)."""
    if source.library == "torchvision":
        import torchvision

        try:
            return str(torchvision.models.get_model_weights(source.name).DEFAULT.url)
        except (AttributeError, ValueError, KeyError):
            return None
    if source.name.startswith(HUB_PREFIXES):
        return None
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(source.name)
    if cfg is None or cfg.hf_hub_id:
        return None
    return cfg.url or None


def published_host(source: ModelSource, pretrained: bool) -> str | None:
    """The host building ``source`` reaches: the Hub for timm weights and ``hf-hub:`` configs,
    the URL's host for torch.hub weights; None when nothing is fetched."""
    if source.library == "timm" and source.name.startswith(HUB_PREFIXES):
        return hub_host()
    if not pretrained:
        return None
    url = weights_url(source)
    if url is not None:
        return urlparse(url).hostname
    if source.library == "timm":
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(source.name)
        return hub_host() if cfg is not None and cfg.hf_hub_id else None
    return None


def can_reach(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether one TCP connection to ``host`` (or to the HTTPS proxy that would carry it)
    opens within ``timeout`` seconds, name lookup included."""
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname or host, parsed.port or 8080
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)  # a name lookup has no timeout
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def torch_hub_cached(url: str) -> bool:
    """Whether torch.hub already holds the file of ``url`` (it then reads it without network)."""
    import torch

    name = Path(urlparse(url).path).name
    return bool(name) and (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file()


def hub_offline_mode() -> bool:
    """Whether the Hugging Face Hub client runs offline (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Run the Hub client in its offline mode (local cache only, no retries) for a while.
    ``HF_HUB_OFFLINE`` is read once at import, so the runtime switch is its constant."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def published_weights(source: ModelSource, pretrained: bool) -> Iterator[None]:
    """Around building ``source`` (with its published weights when ``pretrained``): probe the
    host once; offline, read only the local caches and raise at once when they lack the files.

    Raises `WeightsUnavailable` (pretrained weights) or `ModelLoadError` (an ``hf-hub:``
    model's config) naming the host; the message names no option (callers add theirs).
    """
    host = published_host(source, pretrained)
    if host is None:
        yield
        return
    offline = hub_offline_mode() or not can_reach(host)
    if not offline:
        yield
        return
    _logger.info("%s cannot be reached: using the local caches only", host)
    what = f"the published weights of {source.display_name}"
    missing = f"{what} are not in the local cache and {host} cannot be reached (offline?)"
    url = weights_url(source) if pretrained else None
    if url is not None and not torch_hub_cached(url):
        raise WeightsUnavailable(missing)
    try:
        with _hub_offline():
            yield
    except Exception as exc:  # offline, any failure to build is a file missing from the cache
        if not pretrained:
            raise ModelLoadError(
                f"{source.name} is described on the Hugging Face Hub, which cannot be reached "
                "(offline?); use its timm architecture name with a local weights file"
            ) from exc
        raise WeightsUnavailable(missing) from exc
