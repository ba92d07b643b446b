"""Sharing quantized models on the Hugging Face Hub.

Upload is ``save_pretrained`` into a folder (packed safetensors + config.json with the top-level
``quantization_config``), the bit report and a model card, then one commit through
``huggingface_hub.HfApi``. Download is ``snapshot_download`` plus a check that the files are an
adq_hf checkpoint. Loading a downloaded model is the usual ``timm.create_model("hf-hub:...")`` /
``from_pretrained`` once ``adq_hf`` is imported.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, Optional

from torch import nn

from .model_card import CARD_NAME, read_checkpoint_folder, write_model_card

DEFAULT_COMMIT_MESSAGE = "Upload quantized model (adq_hf)"


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    model_config: Optional[dict] = None,
    data_config: Optional[dict] = None,
    results: Optional[Dict[str, Any]] = None,
    recipe_config: Optional[str] = None,
    command: Optional[str] = None,
    base_model: Optional[str] = None,
    dataset: Optional[str] = None,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    token: Optional[str] = None,
    create_pr: bool = False,
):
    """Upload a quantized timm or transformers model with its bit report and model card.

    ``results`` (measured metrics, as the recipe's results.json) go into the card; nothing else
    is claimed there. ``token`` defaults to the environment (``HF_TOKEN`` or the saved login).
    Returns huggingface_hub's ``CommitInfo`` (``.oid`` is the new commit, ``.pr_url`` for a PR).
    """
    from .integrations.timm import save_pretrained
    from .mixed_precision import write_report

    with tempfile.TemporaryDirectory(prefix="adq_hf-push-") as folder:
        save_pretrained(model, folder, model_config=model_config, data_config=data_config)
        write_report(model, None, folder)
        write_model_card(folder, repo_id=repo_id, results=results, recipe_config=recipe_config, command=command,
                         base_model=base_model, dataset=dataset)
        return push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                           token=token, create_pr=create_pr, card=False)


def push_folder(
    folder: str,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    token: Optional[str] = None,
    create_pr: bool = False,
    card: bool = True,
):
    """Upload a saved checkpoint folder (e.g. a recipe's ``final/``) as one commit.

    The folder is checked first (config.json with an adq ``quantization_config``, a readable
    adq_hf safetensors header), so a wrong folder fails before anything is created on the Hub.
    With ``card=True`` and no README.md in the folder, a card is rendered from the folder
    (no accuracy section: results are only written when measured ones are given).
    ``revision`` names a branch, created from main when it does not exist.
    """
    from .model_card import render_model_card

    read_checkpoint_folder(folder)
    extra = {}
    if card and not os.path.isfile(os.path.join(folder, CARD_NAME)):
        extra[CARD_NAME] = render_model_card(folder, repo_id=repo_id).encode()
    return _upload(folder, repo_id, private, revision, commit_message, token, create_pr, extra)


def _upload(folder, repo_id, private, revision, commit_message, token, create_pr, extra=None):
    from huggingface_hub import CommitOperationAdd, HfApi

    if create_pr and revision not in (None, "main"):
        raise ValueError("create_pr=True opens a pull request against main; do not pass a revision as well.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"),
                           path_or_fileobj=os.path.join(root, name))
        for root, _, names in os.walk(folder) for name in sorted(names)
        if not name.endswith(".tmp") and ".tmp-" not in name  # never a half-written file
    ]
    operations += [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in (extra or {}).items()]
    return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision,
                             create_pr=create_pr)


def download(
    repo_id: str,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    local_dir: Optional[str] = None,
    token: Optional[str] = None,
) -> str:
    """Download a quantized checkpoint (all its files) and return the local folder, checked."""
    from huggingface_hub import snapshot_download

    folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_dir=local_dir, token=token)
    read_checkpoint_folder(folder)
    return folder
