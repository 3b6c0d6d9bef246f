"""An experiment's prompts: `prompts = "<file>"` (one prompt a line, blank lines ignored, e.g. COCO
captions) or an inline list. Samples cycle through them in order. Torch-free.

A file is read when the catalogue loads (an empty or missing file is an error there) and its
SHA-256 is stored in each run's config; the worker reads it again and refuses a file that changed,
so a run's prompts are the ones its config names.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


class PromptsError(Exception):
    pass


def read_prompts(path: str | Path) -> tuple[list[str], str]:
    """(prompts, sha256 of the file) of a prompts file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PromptsError(f"{path}: no such prompts file") from None
    except OSError as exc:
        raise PromptsError(f"{path}: cannot read the prompts file ({exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptsError(f"{path}: not UTF-8 text ({exc})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptsError(f"{path}: the prompts file is empty (one prompt a line)")
    return prompts, hashlib.sha256(data).hexdigest()


def sampling_prompts(sampling) -> list[str] | None:
    """The prompts of a run's `SamplingConfig` (None: the model's own class prompts)."""
    if sampling.prompts is not None:
        return list(sampling.prompts)
    if sampling.prompts_file is None:
        return None
    prompts, digest = read_prompts(sampling.prompts_file)
    if sampling.prompts_sha256 and digest != sampling.prompts_sha256:
        raise PromptsError(f"{sampling.prompts_file}: the prompts file changed since the experiment was queued "
                           "(its SHA-256 differs); queue the run again")
    return prompts
