"""The Hub face of a run: what makes a run folder a Hugging Face Hub model repo, and runs taken by name.

A finished run folder also holds, beside its weights (``model.safetensors``):

- ``config.json``: timm's shape (``architecture`` = the backbone, ``num_classes``, ``num_features``,
  ``label_names``, ``pretrained_cfg`` with the run's preprocessing), plus an ``attnzoo`` block (module, kind,
  sites, options, attnzoo's version, the maps' decision shares). Read against ``HubConfig``, as attnzoo.json
  is against its schema. timm's ``create_model("hf-hub:...")`` reads the same file, so timm users see a model
  repo they know.
- ``README.md``: a model card whose YAML front matter huggingface_hub reads (``library_name: attnzoo``, tags,
  license, base model, a model-index of the validation accuracy and, with boxes, the pointing game), then the
  attention figure, the decision shares, the command that trained it and how to load it.

Neither holds a local path: attnzoo.json, which does (the data folder), is never part of the Hub face.

A run is taken by name wherever one is read (``load_run``, ``--run``): a run folder, ``local-dir:PATH`` (a
folder read as a Hub repo: its ``config.json``), or ``hf-hub:org/name[@revision]``, downloaded into the Hub
cache (only JSON, safetensors, the card and the figures; a cached repo loads offline). Nothing is unpickled: a
repo without ``model.safetensors`` is refused, whatever pickles it holds.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from ..errors import AttnzooError, first_line
from ..train.settings import TIMM_KEYWORDS
from .card import model_card
from .folder import (
    CONFIG,
    HUB_CONFIG,
    HUB_FILES,
    MODEL_CARD,
    PLOTS,
    WEIGHTS,
    MapVerdict,
    RunFolder,
    Strict,
    check_against,
    check_config,
    read_json,
    recorded_data_root,
)
from .outputs import check_new_folder, refuse_data_folder, refuse_inside_data, replace_text, write_new

HUB, LOCAL_DIR = "hf-hub:", "local-dir:"
HUB_FORMAT = 1
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")  # the Hub's license ids: apache-2.0, cc-by-4.0, other...


# --- names ---------------------------------------------------------------------------------------------------

def is_name(run: str | os.PathLike) -> bool:
    """``run`` names a Hub repo or a folder read as one (``hf-hub:``, ``local-dir:``), not a run folder."""
    return os.fspath(run).startswith((HUB, LOCAL_DIR))


@dataclass(frozen=True)
class Source:
    """Where a run is read from: ``folder`` on this machine, and the name it was given when it is a Hub repo or a
    folder read as one (``name``; then its ``config.json`` is read, and nothing is written into the folder)."""

    folder: Path
    name: str | None = None

    @property
    def hub_face(self) -> bool:
        """Read ``config.json``, not ``attnzoo.json``: a name, or a folder holding only the Hub face."""
        return self.name is not None or (not (self.folder / CONFIG).is_file() and (self.folder / HUB_CONFIG).is_file())

    @property
    def title(self) -> str:
        """The run's name in file names: the repo's for ``hf-hub:``, else the folder's."""
        if self.name is not None and self.name.startswith(HUB):
            return split_repo(self.name)[0].rsplit("/", 1)[-1]
        return self.folder.resolve().name or "run"


def split_repo(name: str) -> tuple[str, str | None]:
    """``hf-hub:org/name@rev`` -> ``("org/name", "rev")``; the repo id checked as the Hub checks it (a name
    without the prefix: a repo id as ``push`` takes it, and the messages say so)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, _, revision = name.removeprefix(HUB).partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        form = "hf-hub:ORG/NAME" if name.startswith(HUB) else "ORG/NAME"
        raise AttnzooError(f"{name}: not a Hub repo id ({first_line(e)}); write {form}") from None
    if "/" not in repo_id:
        raise AttnzooError(f"{name}: a Hub model repo is named ORG/NAME (or USER/NAME)")
    return repo_id, revision or None


def locate(run: str | os.PathLike) -> Source:
    """The folder a run is read from: a run folder, ``local-dir:PATH``, or ``hf-hub:org/name[@rev]`` downloaded
    into the Hub cache (offline: the cached snapshot, or one line saying it is not there)."""
    name = os.fspath(run)
    if name.startswith(HUB):
        return Source(download(name), name)
    if name.startswith(LOCAL_DIR):
        folder = Path(name.removeprefix(LOCAL_DIR)).expanduser()
        if not folder.is_dir():
            raise AttnzooError(f"{name}: no such folder")
        return Source(folder, name)
    return Source(Path(run))


def download(name: str) -> Path:
    """``hf-hub:org/name[@rev]`` in the Hub cache: the config, the card, safetensors and figures only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .. import __version__
    from ..model.weights import unreachable

    repo_id, revision = split_repo(name)
    why = unreachable()  # seconds, not the minute of retries the hub client takes to find out
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_FILES),
                                      local_files_only=bool(why), library_name="attnzoo", library_version=__version__))
    except IncompleteSnapshotError:
        raise AttnzooError(f"{name} is only partly in the local Hub cache and the Hub cannot be reached"
                           f"{f' ({why})' if why else ''}; connect once to finish the download") from None
    except LocalEntryNotFoundError:
        how = f"the Hub cannot be reached ({why})" if why else "the Hub could not be reached"
        raise AttnzooError(f"{name} is not in the local Hub cache and {how}; connect once to download it") from None
    except RevisionNotFoundError:
        raise AttnzooError(f"{name}: the repo has no revision '{revision}'") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise AttnzooError(f"{name}: no such model repo on the Hub, or it is private or gated and your token "
                           f"cannot read it (log in with `hf auth login`)") from None
    except Exception as e:  # HfHubHTTPError, OSError, and the hub client's other network errors
        raise AttnzooError(f"cannot download {name}: {first_line(e)}") from e


def hub_weights(source: Source) -> Path:
    """The weights of a Hub repo (or a folder read as one): ``model.safetensors``, or one line refusing it.
    Nothing else is ever read: a pickle (``pytorch_model.bin``, ``*.pth``) can run any code it holds."""
    weights = source.folder / WEIGHTS
    if weights.is_file():
        return weights
    pickles = sorted(p.name for p in source.folder.iterdir() if p.suffix.lower() in PICKLES)
    held = f" (only {', '.join(pickles[:3])})" if pickles else ""
    raise AttnzooError(f"{source.name or source.folder} has no {WEIGHTS}{held}: attnzoo reads weights from "
                       f"safetensors only, never a pickle (pytorch_model.bin, *.pth), which can run any code it holds")


# --- config.json: one schema ---------------------------------------------------------------------------------

class Preprocessing(Strict):
    """timm's ``pretrained_cfg``, the keys attnzoo reads: a square RGB (or grey) input, squashed, then
    normalised, one mean and std per channel."""

    input_size: list[int] = Field(min_length=3, max_length=3)
    mean: list[float] = Field(min_length=1, max_length=3)
    std: list[float] = Field(min_length=1, max_length=3)


class AttnzooBlock(Strict):
    """``config.json``'s ``attnzoo`` block: what timm's keys cannot say."""

    format: int = Field(HUB_FORMAT, ge=1)
    version: str
    attn: str = Field(min_length=1)
    kind: str | None = None
    sites: list[str] = Field(default_factory=list)
    attn_options: dict[str, Any] = Field(default_factory=dict)
    pretrained: bool | None = None
    base_model: str | None = None
    seed: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    maps: dict[str, MapVerdict] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)


class HubConfig(Strict):
    """``config.json``: timm's keys and the ``attnzoo`` block."""

    architecture: str = Field(min_length=1)
    num_classes: int = Field(ge=1)
    num_features: int | None = None
    label_names: list[str] = Field(min_length=1)
    pretrained_cfg: Preprocessing
    model_args: dict[str, Any] = Field(default_factory=dict)
    attnzoo: AttnzooBlock


def read_hub_config(folder: Path, name: str | None = None) -> dict[str, Any]:
    """The record that builds the model (attnzoo.json's keys: backbone, attn, sites, classes, preprocessing...)
    from ``folder/config.json``, checked against ``HubConfig`` and then ``RunConfig``: one line per problem."""
    where = f"{name}: {HUB_CONFIG}" if name and name.startswith(HUB) else folder / HUB_CONFIG
    if not (folder / HUB_CONFIG).is_file():
        raise AttnzooError(f"{name or folder}: no {HUB_CONFIG}; not a model repo attnzoo wrote")
    config = read_json(folder / HUB_CONFIG)
    if isinstance(config, dict) and "attnzoo" not in config and "architecture" in config:
        raise AttnzooError(f"{where}: a timm model, not an attnzoo run (no attnzoo block); load it with "
                           f"timm.create_model(\"{name or f'local-dir:{folder}'}\")")
    block = config.get("attnzoo") if isinstance(config, dict) else None
    if isinstance(block, dict) and isinstance(block.get("format"), int) and block["format"] > HUB_FORMAT:
        raise AttnzooError(f"{where}: written by a newer attnzoo (format {block['format']}; this one reads "
                           f"{HUB_FORMAT}): upgrade attnzoo")
    check_against(HubConfig, config, where)
    size = config["pretrained_cfg"]["input_size"]
    if size[0] not in (1, 3) or size[1] != size[2]:
        raise AttnzooError(f"{where}: pretrained_cfg.input_size: attnzoo reads square RGB or grey inputs [3 or 1, S, "
                           f"S], got {size}")
    if config["num_classes"] != len(config["label_names"]):
        raise AttnzooError(f"{where}: num_classes is {config['num_classes']} but label_names names "
                           f"{len(config['label_names'])}")
    a, pc = config["attnzoo"], config["pretrained_cfg"]
    record = dict(backbone=config["architecture"], attn=a["attn"], attn_options=a["attn_options"], sites=a["sites"],
                  classes=config["label_names"], img_size=size[-1], mean=pc["mean"], std=pc["std"], seed=a["seed"],
                  timm_kwargs={k: v for k, v in config.get("model_args", {}).items() if k in TIMM_KEYWORDS},
                  pretrained=a["pretrained"], status="done", metrics={"final": a["metrics"]}, maps=a["maps"],
                  versions=a["versions"])
    return check_config(record, where)


# --- writing the face ----------------------------------------------------------------------------------------

def hub_config(record: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` of a run, from its ``attnzoo.json`` record: timm's keys, and the ``attnzoo`` block."""
    from .. import __version__
    from ..model.create import preprocessing_cfg

    num_features, model_args, kind = _timm_shape(record)
    cfg = preprocessing_cfg(record["img_size"], record["mean"], record["std"], record["classes"], len(record["mean"]))
    classes = cfg.pop("label_names")
    config: dict[str, Any] = dict(architecture=record["backbone"], num_classes=len(classes),
                                  num_features=num_features, label_names=classes,
                                  pretrained_cfg={**cfg, "input_size": list(cfg["input_size"]),
                                                  "mean": list(cfg["mean"]), "std": list(cfg["std"])})
    if model_args:
        config["model_args"] = model_args
    final = (record.get("metrics") or {}).get("final") or {}
    config["attnzoo"] = dict(
        format=HUB_FORMAT, version=__version__, attn=record.get("attn") or "none", kind=kind,
        sites=list(record.get("sites") or []), attn_options=dict(record.get("attn_options") or {}),
        pretrained=record.get("pretrained"), base_model=base_model(record), seed=record.get("seed"),
        metrics={k: v for k, v in final.items() if isinstance(v, (int, float)) and math.isfinite(v)},
        maps=dict(record.get("maps") or {}), versions=dict(record.get("versions") or {}))
    return config


def _timm_shape(record: Mapping[str, Any]) -> tuple[int, dict[str, Any], str | None]:
    """The backbone's ``num_features``, the timm keywords it is built with at the run's size, and the module's
    kind: from a model on the meta device (no memory, no weights)."""
    import torch

    from ..model.registry import get_attention
    from ..model.sites import introspect, timm_model

    extra = dict(record.get("timm_kwargs") or {})
    info = introspect(record["backbone"], record["img_size"], extra)
    with torch.device("meta"):
        num_features = int(timm_model(record["backbone"], pretrained=False, **{**extra, **dict(info.timm_kwargs)}
                                      ).num_features)
    attn = record.get("attn")
    kind = get_attention(attn).kind if attn not in (None, "none") else None
    return num_features, {**extra, **dict(info.timm_kwargs)}, kind


def base_model(record: Mapping[str, Any]) -> str | None:
    """The Hub repo of the timm weights the run started from; None from scratch or from a local file (whose
    path is never published)."""
    if not record.get("pretrained") or record.get("weights"):
        return None
    import timm

    cfg = timm.models.get_pretrained_cfg(record["backbone"])
    return getattr(cfg, "hf_hub_id", None) or None


def render_face(folder: RunFolder, repo_id: str | None = None, license: str | None = None) -> dict[str, str]:
    """The texts of a finished run's Hub face, ``{config.json: ..., README.md: ...}``, from its attnzoo.json;
    the repo and license default to those of its last push."""
    record = folder.record or folder.read_config()
    if record.get("status") != "done":
        raise AttnzooError(f"{folder.path} has not finished training (status: {record.get('status')}); only a "
                           f"finished run has a Hub face")
    if not folder.file(WEIGHTS).is_file():
        raise AttnzooError(f"{folder.path} has no {WEIGHTS}")
    shared = record.get("hub") or {}
    figures = [f for f in PLOTS.values() if folder.file(f).is_file()]
    config = hub_config(record)
    card = model_card(record, config, repo_id or shared.get("repo_id"), license or shared.get("license"), figures)
    return {HUB_CONFIG: json.dumps(config, indent=2, allow_nan=False) + "\n", MODEL_CARD: card}


def write_face(folder: RunFolder, repo_id: str | None = None, license: str | None = None) -> list[str]:
    """Write ``config.json`` and ``README.md`` into a finished run folder (its own files: replaced, atomically;
    a file of the same name that attnzoo did not write is refused). Returns the Hub files the folder now holds,
    the figures included: what a push uploads."""
    for name in (HUB_CONFIG, MODEL_CARD):
        _check_ours(folder.file(name))
    texts = render_face(folder, repo_id, license)  # made (and the card checked) before either is written
    try:
        for name, text in texts.items():
            replace_text(folder.file(name), text)
    except OSError as e:
        raise AttnzooError(f"cannot write the Hub face into {folder.path}: {e.strerror or e}; write it to a new "
                           f"folder with `attnzoo export {folder.path} --format hub --out DIR`") from None
    return [f for f in HUB_FILES if folder.file(f).is_file()]


def _check_ours(path: Path) -> None:
    """A ``config.json`` or ``README.md`` already in a run folder is attnzoo's (it says so), or it stays."""
    if not path.exists():
        return
    text = path.read_text(errors="replace") if path.is_file() else ""
    ours = '"attnzoo"' in text if path.name == HUB_CONFIG else "library_name: attnzoo" in text
    if not ours:
        raise AttnzooError(f"{path} was not written by attnzoo; attnzoo does not write over files: move it away, "
                           f"or export the Hub face to a new folder with --out")


def export_face(run: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[Path, list[str]]:
    """What ``attnzoo export RUN --format hub`` does: the Hub face of a finished run, written into the run folder
    (``out`` None: for runs that finished before attnzoo wrote it), or into a new folder ``out`` with copies of
    the weights and figures, leaving the run folder as it is. Returns the folder and its Hub files."""
    import shutil
    from functools import partial

    if is_name(run):
        raise AttnzooError(f"--format hub makes the Hub face of a run folder; {run} already is a Hub repo")
    if out is not None:
        check_new_folder(out)
        refuse_data_folder(out)
    folder = RunFolder.open(run)
    if out is not None:  # its figures and files would be read as data where fit reads images
        refuse_inside_data(out, recorded_data_root(folder.record))
    if out is None:
        return folder.path, write_face(folder)
    texts = render_face(folder)
    target = Path(out)
    names = [f for f in HUB_FILES if f in texts or folder.file(f).is_file()]
    for name in names:
        write = (partial(Path.write_text, data=texts[name], encoding="utf-8") if name in texts
                 else partial(shutil.copyfile, folder.file(name)))
        write_new(target / name, write, fresh=False)
    return target, names


def uploads(folder: Path, files: Sequence[str]) -> list[tuple[str, Path]]:
    """``(path in the repo, local file)`` of the Hub files: the only files a push sends."""
    allowed = set(HUB_FILES)
    return [(name, folder / name) for name in files if name in allowed and (folder / name).is_file()]

