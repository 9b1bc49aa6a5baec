"""Models by Hugging Face Hub id (`org/name`, `org/name@revision`), resolved through huggingface_hub's cache.

huggingface_hub does the work: the shared cache (HF_HUB_CACHE, ~/.cache/huggingface/hub), HF_HUB_OFFLINE
(then only what is cached resolves), tokens, revisions. Only the files of a model directory are fetched
(config, tokenizer, safetensors weights), not a repository's other formats. The commit a revision
resolved to is returned so that a run records exactly which weights it read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlc.errors import InputError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class HubModel:
    path: Path  # the snapshot directory in the cache
    repo: str
    revision: str  # as asked ("main" when not given)
    commit: str  # the commit that revision resolved to


def is_hub_id(text: str) -> bool:
    """Whether text is shaped like a Hub id (a local path of that shape is still taken as a path first)."""
    return HUB_ID.match(text) is not None


def resolve_hub(text: str) -> HubModel:
    """The cached (downloading if allowed) model directory of a Hub id; InputError when it cannot be had."""
    m = HUB_ID.match(text)
    if m is None:
        raise InputError(f"{text} is not a Hub id", "write org/name or org/name@revision")
    repo, revision = m["repo"], m["revision"] or "main"
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILES, local_files_only=offline))
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise InputError(f"{text}: no such model or revision on the Hub", "check the id, or give a local path") from None
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise InputError(f"{text} is neither a local path nor in the Hugging Face cache ({where})",
                         f"download it where the Hub is reachable (`hf download {repo}`), or give a local path") from None
    except (HfHubHTTPError, OSError) as e:
        raise InputError(f"{text}: the Hub answered {type(e).__name__}: {str(e).splitlines()[0]}", "give a local path") from None
    return HubModel(path, repo, revision, path.name)
