"""Where a config's models are: local paths, or Hugging Face model ids (``org/name``,
``org/name@revision``) found in the local Hugging Face cache.

jaxmerge downloads nothing: a model id that is not a local path is looked up in the cache
that ``huggingface_hub`` fills (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``), laid out as ``models--org--name/snapshots/<commit>/`` with
``refs/<branch>`` holding the commit of a branch (``main`` by default).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from jaxmerge.errors import ConfigError

_MODEL_ID = re.compile(r"^(?P<repo>[\w.-]+(/[\w.-]+)?)(@(?P<revision>[\w./-]+))?$")
_COMMIT = re.compile(r"[\w-]+(\.[\w-]+)*")


def cache_dir() -> Path:
    """The Hugging Face hub cache directory this process would use."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = Path(os.environ.get("HF_HOME", Path("~/.cache/huggingface"))).expanduser()
    return home / "hub"


def cached_model(model_id: str) -> Path | None:
    """The cached snapshot directory of ``model_id`` (``org/name[@revision]``), or None.

    The revision is a branch or tag (read from ``refs/``) or a commit hash; ``main`` by default.

    Examples:
      >>> cached_model("no-such-org/no-such-model") is None
      True
    """
    match = _MODEL_ID.fullmatch(model_id)
    if match is None:
        return None
    repo = cache_dir() / f"models--{match['repo'].replace('/', '--')}"
    revision = match["revision"] or "main"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() and ".." not in revision else revision
    if not _COMMIT.fullmatch(commit):  # a commit names one snapshot directory, nothing else
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def without_revision(path: str) -> str:
    """``path`` without a revision (``path@revision``; a revision holds no ``/``)."""
    head, _, revision = path.rpartition("@")
    return head if head and "/" not in revision else path


def resolve_model(path: str, config_dir: Path, where: str) -> Path:
    """A model's directory: the path, else relative to the config, else a Hugging Face id in
    the local cache. A path with a revision (``path@revision``) names the path when it
    exists, whatever the revision, as mergekit reads local models."""
    for local in dict.fromkeys((path, without_revision(path))):
        candidate = Path(local).expanduser()
        for option in (candidate, config_dir / candidate):
            if option.exists():
                return option
    if (cached := cached_model(path)) is not None:
        return cached
    raise ConfigError(f"{where}: path {path!r} does not exist, and no model of that id is in the Hugging Face "
                      f"cache ({cache_dir()}); jaxmerge downloads nothing")
