"""``push``: what ``attnzoo push RUN REPO_ID`` does, a finished run shared as a Hugging Face Hub model repo.

    attnzoo push runs/my-run my-org/flowers-lpa --license apache-2.0
    attnzoo.load_run("hf-hub:my-org/flowers-lpa")      # anywhere, then from the Hub cache, offline too

What is uploaded is the run's Hub face and its figures, nothing else (``folder.HUB_FILES``): ``config.json``,
``model.safetensors``, ``README.md`` and the plots. Never attnzoo.json (it holds local paths), checkpoints,
``skipped.txt`` or the data. The face is written again first, with the repo's name and the license in the card,
so the run folder stays a copy of the repo.

Every check that needs no network comes first, then those that need the Hub, each one line: a run that has not
finished, a bad repo id or license, the Hub out of reach (``HF_HUB_OFFLINE``, no connection), no token, a token
the Hub refuses, and a repo that already holds files (pushed onto only with ``add_commit``, or to a branch with
``revision``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import AttnzooError, first_line
from .folder import RunFolder
from .hub import LICENSE, is_name, split_repo, uploads, write_face


@dataclass
class Pushed:
    """What ``push`` uploaded, and where."""

    repo_id: str
    url: str  # the repo's page (its branch's, with a revision)
    revision: str | None
    commit: str | None
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dict(repo_id=self.repo_id, url=self.url, revision=self.revision, commit=self.commit, files=self.files)


def push(run: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         license: str | None = None, add_commit: bool = False, token: str | None = None) -> Pushed:
    """Upload the finished run folder ``run`` to the Hub model repo ``repo_id`` (see the module docstring).
    ``private``: a new repo is private. ``revision``: a branch, made when missing. ``license``: a Hub license
    id, written in the card (and kept for the next push). ``add_commit``: add a commit to a repo that already
    holds files. ``token``: default, the one ``hf auth login`` saved or ``HF_TOKEN``."""
    folder = _finished(run)
    if "@" in repo_id:
        raise AttnzooError(f"push takes a repo id, ORG/NAME; give the branch with --revision, not '{repo_id}'")
    split_repo(repo_id)  # a bad id, before any network
    if license is not None and not LICENSE.fullmatch(license):
        raise AttnzooError(f"--license takes a Hub license id (apache-2.0, mit, cc-by-4.0, other...), "
                           f"got '{license}'")
    api = _hub_api(token)
    _check_repo(api, repo_id, revision, add_commit)
    license = license or (folder.record.get("hub") or {}).get("license")
    files = write_face(folder, repo_id, license)
    return _upload(api, folder, repo_id, files, private=private, revision=revision, license=license)


def _finished(run: str | os.PathLike) -> RunFolder:
    if is_name(str(run)):
        raise AttnzooError(f"push takes a run folder, not {run}")
    folder = RunFolder.open(run)
    status = folder.record.get("status")
    if status != "done":
        raise AttnzooError(f"{folder.path} has not finished training (status: {status}); push a finished run")
    return folder


def _hub_api(token: str | None) -> Any:
    """An ``HfApi`` with a token the Hub accepts, or one line saying why not."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from ..model.weights import unreachable

    why = unreachable()
    if why:
        raise AttnzooError(f"cannot push: the Hugging Face Hub cannot be reached ({why})")
    token = token or get_token()
    if not token:
        raise AttnzooError("cannot push: no Hugging Face token; log in with `hf auth login`, or set HF_TOKEN")
    api = HfApi(token=token)
    try:
        api.whoami()
    except (HfHubHTTPError, OSError) as e:
        raise AttnzooError(f"cannot push: the Hub refused the token ({first_line(e)}); log in again with "
                           f"`hf auth login`") from None
    return api


def _check_repo(api: Any, repo_id: str, revision: str | None, add_commit: bool) -> None:
    """A repo that holds files (other than ``.gitattributes``) is pushed onto only when asked: another
    model's repo is not silently mixed with this run."""
    from huggingface_hub.errors import HfHubHTTPError

    if revision is not None or add_commit:
        return
    try:
        if not api.repo_exists(repo_id):
            return
        held = [f for f in api.list_repo_files(repo_id) if f != ".gitattributes"]
    except (HfHubHTTPError, OSError) as e:
        raise AttnzooError(f"cannot push to {repo_id}: {first_line(e)}") from None
    if held:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise AttnzooError(f"{repo_id} already exists and holds {len(held)} files ({shown}); add this run as a new "
                           f"commit with --add-commit, or push it to a branch with --revision BRANCH")


def _upload(api: Any, folder: RunFolder, repo_id: str, files: list[str], *, private: bool, revision: str | None,
            license: str | None) -> Pushed:
    """One commit of exactly the Hub files; then the run records where it went."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    sent = uploads(folder.path, files)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in sent]
    try:
        url = str(api.create_repo(repo_id, private=private, exist_ok=True))
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
            url = f"{url.rstrip('/')}/tree/{revision}"
        info = api.create_commit(repo_id, operations, commit_message=f"attnzoo push of {folder.path.name}",
                                 revision=revision)
    except (HfHubHTTPError, OSError) as e:
        raise AttnzooError(f"cannot push to {repo_id}: {first_line(e)}") from None
    commit = getattr(info, "oid", None)
    folder.update(hub=dict(repo_id=repo_id, license=license, revision=revision, url=url, commit=commit))
    return Pushed(repo_id, url, revision, commit, [name for name, _ in sent])
