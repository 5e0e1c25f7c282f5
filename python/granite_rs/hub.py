"""Model ids of the Hugging Face Hub (``"org/name"``) as local paths, through ``huggingface_hub``
(the optional extra ``granite-rs[hub]``).

Files already in the local HF cache are used without the network (``HF_HUB_OFFLINE=1`` works);
otherwise only the files a model needs are downloaded, with huggingface_hub's progress bars: for
an HF model directory its JSON files, safetensors and chat templates; for a GGUF repository the
one file ``filename`` matches.
"""

from __future__ import annotations

import fnmatch
import re
from os import PathLike
from pathlib import Path
from typing import Optional, Union

# What an HF model directory needs: config, generation config, tokenizer and its config, the
# safetensors (and their index) and chat templates.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "additional_chat_templates/*.jinja"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_repo_id(model: Union[str, PathLike[str]]) -> bool:
    """Whether ``model`` is an HF Hub id ("org/name") rather than a local path."""
    text = str(model)
    return not Path(text).expanduser().exists() and _REPO_ID.fullmatch(text) is not None


def local_path(model: Union[str, PathLike[str]], filename: Optional[str] = None,
               revision: Optional[str] = None) -> str:
    """``model`` itself when it is a local path; for an HF Hub id, the local directory (or with
    ``filename``, a glob such as ``"*Q4_K_M.gguf"``, the one file it matches) in the HF cache,
    downloaded first if it is not there."""
    if not is_repo_id(model):
        if filename is not None or revision is not None:
            raise ValueError(f"filename and revision are for HF Hub ids; {model} is a local path")
        return str(model)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{model} looks like an HF Hub id, and loading one needs huggingface_hub: "
                          "pip install 'granite-rs[hub]' (or pass a local path)") from None
    repo = str(model)
    folder = Path(snapshot_download(repo, revision=revision, allow_patterns=[filename] if filename else MODEL_FILES))
    if filename is None:
        if not (folder / "config.json").is_file():
            ggufs = sorted(p.name for p in folder.glob("*.gguf"))
            where = "filename= (on the command line, --model-file)"
            hint = f"; it holds {ggufs}: pass {where}" if ggufs else f"; for a GGUF repository pass {where}"
            raise FileNotFoundError(f"{repo} has no config.json{hint}")
        return str(folder)
    matches = sorted(p for p in folder.rglob("*") if p.is_file() and fnmatch.fnmatch(p.relative_to(folder).as_posix(), filename))
    if len(matches) != 1:
        found = [p.relative_to(folder).as_posix() for p in matches]
        raise FileNotFoundError(f"{repo}: filename {filename!r} must match one file, matched {found or 'none'}")
    return str(matches[0])
