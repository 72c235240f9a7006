"""A run shared as a Hugging Face Hub model repo, without a network: the Hub face of a fresh run, push (with a
fake ``HfApi``), and runs taken by name (``local-dir:``, ``hf-hub:`` from a Hub cache made here)."""

from __future__ import annotations

import fnmatch
import json
import pickle
import re
import shutil
import socket
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from huggingface_hub import ModelCard, constants
from test_cli import one_line, run_cli

import attnzoo
from attnzoo.errors import AttnzooError
from attnzoo.runs.folder import HUB_FILES, RunFolder
from attnzoo.runs.push import push

HUB_NAMES = {"config.json", "model.safetensors", "README.md"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may reach beyond this machine."""
    connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test_hub_share refuses a connection to {address}")
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


@pytest.fixture
def hub_cache(monkeypatch, tmp_path) -> Path:
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path], ref: str = "main", sha: str = "a" * 40) -> Path:
    """A repo in the Hub cache as huggingface_hub lays it out: snapshots/<commit>/..., refs/<branch>."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / sha
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copyfile(src, snapshot / name)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(sha)
    return snapshot


def hub_files(run: Path) -> dict[str, Path]:
    return {name: run / name for name in HUB_FILES if (run / name).is_file()}


def images(folder: Path) -> list[Path]:
    return sorted(folder.glob("valid/*/*.png"))[:6]


def same_predictions(a: attnzoo.Run, b: attnzoo.Run, paths: list[Path]) -> None:
    probs_a, maps_a = a.predict(paths)
    probs_b, maps_b = b.predict(paths)
    torch.testing.assert_close(probs_b, probs_a, rtol=0, atol=0)
    assert maps_a.keys() == maps_b.keys() and maps_a
    for site in maps_a:
        torch.testing.assert_close(maps_b[site], maps_a[site], rtol=0, atol=0)


def local_paths(*extra: Path) -> list[str]:
    return [str(Path.home()), tempfile.gettempdir(), *map(str, extra)]


# --- the Hub face of a fresh run ---------------------------------------------------------------------------------

def test_a_finished_run_folder_is_a_hub_model_repo_in_timms_shape(tiny_run):
    record = json.loads((tiny_run / "attnzoo.json").read_text())
    config = json.loads((tiny_run / "config.json").read_text())
    assert HUB_NAMES <= {p.name for p in tiny_run.iterdir()} and (tiny_run / "attention.png").is_file()
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 3
    assert config["label_names"] == record["classes"] == ["blue", "green", "red"]
    assert config["num_features"] == timm.create_model("test_resnet").num_features
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["mean"] == record["mean"] and cfg["std"] == record["std"]
    block = config["attnzoo"]
    assert (block["attn"], block["kind"], block["sites"]) == ("lpa-pc", "readout", record["sites"])
    assert block["version"] == attnzoo.__version__ and block["maps"].keys() == record["maps"].keys()


def test_the_hub_face_holds_no_local_path(tiny_run, tiny_folder):
    for name in ("config.json", "README.md"):
        text = (tiny_run / name).read_text()
        for path in local_paths(tiny_folder, tiny_run):
            assert path not in text, (name, path)


def test_the_model_card_is_read_by_huggingface_hub(tiny_run):
    record = json.loads((tiny_run / "attnzoo.json").read_text())
    card = ModelCard.load(tiny_run / "README.md")
    data = card.data
    assert data.library_name == "attnzoo" and data.pipeline_tag == "image-classification"
    assert {"attnzoo", "timm", "lpa-pc", "test_resnet"} <= set(data.tags)
    assert data.base_model is None and data.license is None  # from scratch; no license chosen yet
    (result,) = data.eval_results
    assert result.metric_type == "accuracy" and result.dataset_split == "validation"
    assert result.metric_value == round(record["metrics"]["final"]["accuracy"], 4)
    assert "](attention.png)" in card.text  # the attention figure
    assert "attnzoo fit --backbone test_resnet --attn lpa-pc --data DATA" in card.text
    assert "--epochs 1 --bs 8 --img-size 32 --no-pretrained" in card.text
    assert 'attnzoo.load_run("hf-hub:' in card.text and "| `layer3` |" in card.text  # decision shares


def test_the_card_names_the_pretrained_base_and_the_pointing_game(tiny_run):
    from attnzoo.runs.card import model_card
    from attnzoo.runs.hub import hub_config

    record = json.loads((tiny_run / "attnzoo.json").read_text())
    record.update(pretrained=True, maps={"layer3": {"share": 0.7, "pointing": 0.625, "chance": 0.3, "flags": []}})
    text = model_card(record, hub_config(record), "org/tiny", "apache-2.0", ["attention.png"])
    data = ModelCard(text).data
    assert data.base_model == timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    assert data.license == "apache-2.0" and data.model_name == "tiny"
    assert {(r.metric_type, r.metric_value) for r in data.eval_results} >= {("pointing_game", 0.625)}
    local = hub_config({**record, "weights": "/somewhere/mine.safetensors"})["attnzoo"]["base_model"]
    assert local is None  # weights from a local file: no base model, and never the path


# --- runs taken by name -------------------------------------------------------------------------------------------

def test_local_dir_predicts_like_the_run_folder(tiny_run, tiny_folder, tmp_path):
    original = attnzoo.load_run(tiny_run)
    by_name = attnzoo.load_run(f"local-dir:{tiny_run}")
    assert by_name.source == f"local-dir:{tiny_run}" and by_name.own_folder is None
    same_predictions(original, by_name, images(tiny_folder))
    face_only = tmp_path / "face"  # a folder holding only the Hub face, taken by its path
    face_only.mkdir()
    for name, src in hub_files(tiny_run).items():
        shutil.copyfile(src, face_only / name)
    same_predictions(original, attnzoo.load_run(face_only), images(tiny_folder))


def test_a_cached_hub_repo_loads_offline_and_predicts_like_the_run(tiny_run, tiny_folder, hub_cache):
    assert constants.HF_HUB_OFFLINE  # conftest: the hub client never goes online
    snapshot = cache_repo(hub_cache, "org/tiny", hub_files(tiny_run))
    cache_repo(hub_cache, "org/tiny", {}, ref="v1")
    run = attnzoo.load_run("hf-hub:org/tiny")
    assert run.path == snapshot and run.name == "tiny" and run.own_folder is None
    same_predictions(attnzoo.load_run(tiny_run), run, images(tiny_folder))
    assert attnzoo.load_run("hf-hub:org/tiny@v1").path == snapshot
    with pytest.raises(AttnzooError, match="not in the local Hub cache.*HF_HUB_OFFLINE"):
        attnzoo.load_run("hf-hub:org/tiny@v2")


def test_a_download_asks_for_the_hub_files_only(monkeypatch, tmp_path):
    asked = {}

    def snapshot_download(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        raise OSError("stop here")

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    with pytest.raises(AttnzooError, match="cannot download hf-hub:org/tiny@v3: stop here"):
        attnzoo.load_run("hf-hub:org/tiny@v3")
    assert asked["repo_id"] == "org/tiny" and asked["revision"] == "v3" and asked["local_files_only"]
    patterns = asked["allow_patterns"]
    for wanted in ("config.json", "model.safetensors", "README.md", "attention.png"):
        assert any(fnmatch.fnmatch(wanted, p) for p in patterns), wanted
    for never in ("pytorch_model.bin", "model.pth", "attnzoo.json", "checkpoints/last.safetensors", "skipped.txt"):
        assert not any(fnmatch.fnmatch(never, p) for p in patterns), never


class Detonator:
    """Unpickling this creates ``marker``: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("how", ["local-dir", "hf-hub"])
def test_a_repo_holding_only_a_pickle_is_refused_and_nothing_is_unpickled(tiny_run, tmp_path, hub_cache, how):
    marker = tmp_path / "unpickled"
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copyfile(tiny_run / "config.json", repo / "config.json")
    (repo / "pytorch_model.bin").write_bytes(pickle.dumps(Detonator(marker)))
    name = f"local-dir:{repo}"
    if how == "hf-hub":
        cache_repo(hub_cache, "org/pickled", {"config.json": repo / "config.json"})  # a download skips the .bin
        name = "hf-hub:org/pickled"
    with pytest.raises(AttnzooError, match="has no model.safetensors.*never a pickle") as e:
        attnzoo.load_run(name)
    assert (how == "local-dir") == ("only pytorch_model.bin" in str(e.value))
    assert "\n" not in str(e.value) and not marker.exists()


def test_a_plain_timm_repo_is_named_as_one(tmp_path, tiny_run):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "test_resnet", "num_classes": 3,
                                                      "pretrained_cfg": {"input_size": [3, 32, 32]}}))
    shutil.copyfile(tiny_run / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(AttnzooError, match=r"a timm model, not an attnzoo run.*timm.create_model"):
        attnzoo.load_run(f"local-dir:{tmp_path}")


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(label_names="red"), "label_names: input should be a valid list"),
    (lambda c: c.update(num_classes=4), "num_classes is 4 but label_names names 3"),
    (lambda c: c["pretrained_cfg"].update(input_size=[3, 32, 48]), "square RGB or grey inputs"),
    (lambda c: c["attnzoo"].pop("attn"), "attnzoo.attn: missing"),
    (lambda c: c["attnzoo"].update(format=9), "newer attnzoo"),
])
def test_config_json_is_checked_against_its_schema(tiny_run, tmp_path, change, message):
    for name, src in hub_files(tiny_run).items():
        shutil.copyfile(src, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    change(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(AttnzooError, match=re.escape(message)) as e:
        attnzoo.load_run(f"local-dir:{tmp_path}")
    assert "\n" not in str(e.value)


def test_plain_timm_loads_the_backbone_as_the_card_shows(tiny_run, monkeypatch):
    """The card's timm-only snippet runs, loads strictly, and gives the attnzoo model's backbone features."""
    card = (tiny_run / "README.md").read_text()
    snippet = card.split("With timm alone", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda repo_id, filename: str(tiny_run / filename))
    scope: dict = {}
    exec(snippet, scope)
    backbone = scope["backbone"].eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_features(x), attnzoo.load_run(tiny_run).model.forward_features(x))
    built = timm.create_model(f"local-dir:{tiny_run}")  # timm reads config.json: architecture, classes, preprocessing
    assert built.num_classes == 3 and built.pretrained_cfg["label_names"] == ["blue", "green", "red"]
    assert tuple(timm.data.resolve_data_config(model=built)["input_size"]) == (3, 32, 32)


@pytest.mark.parametrize("attn,whole", [("none", True), ("softmask-sigmoid", False)])
def test_plain_timm_loads_a_gate_or_baseline_backbone_as_the_card_says(tmp_path, monkeypatch, attn, whole):
    """A baseline's repo is a whole timm model; a gate model's backbone loads too, but without its gates it is
    not the model (the card says which)."""
    from attnzoo.runs.hub import write_face

    model = attnzoo.create_model("test_resnet", attn, num_classes=3, img_size=32).eval()
    record = dict(backbone="test_resnet", attn=attn, sites=model.sites, classes=["a", "b", "c"], img_size=32,
                  mean=[0.5] * 3, std=[0.5] * 3, status="done")
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.save(model, record)
    write_face(folder)
    card = (folder.path / "README.md").read_text()
    assert ("the whole model" in card) == whole and ("not this model's predictions" in card) == (not whole)
    snippet = card.split("With timm alone", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda repo_id, filename: str(folder.path / filename))
    scope: dict = {}
    exec(snippet, scope)  # loads strictly: every backbone tensor, nothing left over
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.equal(scope["backbone"].eval()(x), model(x))
    assert same == whole


# --- push --------------------------------------------------------------------------------------------------------

class FakeHub:
    """``HfApi`` as push uses it: repos are folders under ``root``; one commit writes its files there."""

    root: Path
    held: dict[str, list[str]] = {}
    calls: list[tuple] = []

    def __init__(self, token=None, **_):
        self.calls.append(("init", token))

    def whoami(self):
        return {"name": "someone"}

    def repo_exists(self, repo_id):
        return repo_id in self.held

    def list_repo_files(self, repo_id, revision=None):
        return self.held[repo_id]

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch))

    def create_commit(self, repo_id, operations, commit_message, revision=None):
        self.calls.append(("create_commit", repo_id, revision, [op.path_in_repo for op in operations]))
        for op in operations:
            target = self.root / repo_id / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, target)
        return SimpleNamespace(oid="b" * 40)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An online Hub with a token: a ``FakeHub``."""
    FakeHub.root, FakeHub.held, FakeHub.calls = tmp_path / "remote", {}, []
    monkeypatch.setattr("huggingface_hub.HfApi", FakeHub)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test")
    monkeypatch.setattr("attnzoo.model.weights.unreachable", lambda: None)
    return FakeHub


@pytest.fixture
def own_run(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run, with what must never be uploaded."""
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run, run)
    (run / "skipped.txt").write_text(f"path\treason\n{tmp_path}/broken.png\tnot an image\n")
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "last.safetensors").write_bytes(b"not uploaded")
    return run


def test_push_uploads_exactly_the_hub_files_with_no_local_path(hub, own_run, tiny_folder, tmp_path):
    pushed = push(own_run, "org/tiny", license="apache-2.0")
    (commit,) = [c for c in hub.calls if c[0] == "create_commit"]
    uploaded = commit[3]
    assert set(uploaded) == {n for n in HUB_FILES if (own_run / n).is_file()} and HUB_NAMES <= set(uploaded)
    assert sorted(pushed.files) == sorted(uploaded) and pushed.url == "https://huggingface.co/org/tiny"
    for name in uploaded:
        data = (hub.root / "org/tiny" / name).read_bytes()
        for path in local_paths(tiny_folder, own_run, tmp_path):
            assert path.encode() not in data, (name, path)
    card = ModelCard.load(hub.root / "org/tiny" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "attnzoo"
    assert card.data.model_name == "tiny" and 'load_run("hf-hub:org/tiny")' in card.text
    assert RunFolder.open(own_run).record["hub"]["repo_id"] == "org/tiny"  # the next push keeps the license


def test_a_pushed_run_loads_by_name_and_predicts_like_the_original(hub, own_run, tiny_folder, hub_cache):
    push(own_run, "org/tiny")
    remote = hub.root / "org/tiny"
    cache_repo(hub_cache, "org/tiny", {p.name: p for p in remote.iterdir()})
    same_predictions(attnzoo.load_run(own_run), attnzoo.load_run("hf-hub:org/tiny"), images(tiny_folder))


def test_push_refuses_a_repo_holding_other_files_unless_asked(hub, own_run, capsys):
    hub.held["org/taken"] = [".gitattributes", "model.pt", "notes.md"]
    code, out, err = run_cli(capsys, "push", str(own_run), "org/taken")
    assert code == 2 and "holds 2 files (model.pt, notes.md)" in err and "--add-commit" in err
    assert len(err.strip().splitlines()) == 1 and not [c for c in hub.calls if c[0] == "create_commit"]
    code, out, _ = run_cli(capsys, "push", str(own_run), "org/taken", "--revision", "attnzoo", "--json")
    assert code == 0 and json.loads(out)["url"] == "https://huggingface.co/org/taken/tree/attnzoo"
    assert ("create_branch", "org/taken", "attnzoo") in hub.calls
    code, out, _ = run_cli(capsys, "push", str(own_run), "org/taken", "--add-commit", "--private")
    assert code == 0 and "https://huggingface.co/org/taken" in out
    assert ("create_repo", "org/taken", True) in hub.calls


def test_push_offline_is_one_line_exit_2_before_any_hub_call(capsys, own_run, monkeypatch):
    def no_api(*_, **__):
        raise AssertionError("HfApi was used offline")

    monkeypatch.setattr("huggingface_hub.HfApi", no_api)
    code, out, err = run_cli(capsys, "push", str(own_run), "org/tiny")
    assert code == 2 and out == ""
    assert err.strip() == "error: cannot push: the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE is set)"


@pytest.mark.parametrize("args,setup,message", [
    (["org/tiny"], lambda hub, run, mp: mp.setattr("huggingface_hub.get_token", lambda: None),
     "no Hugging Face token"),
    (["not a repo"], None, "not a Hub repo id"),
    (["bad..name"], None, "not a Hub repo id (Cannot have -- or .. in repo_id: 'bad..name'.); write ORG/NAME"),
    (["org/tiny@v1"], None, "give the branch with --revision"),
    (["org/tiny", "--license", "Apache 2"], None, "--license takes a Hub license id"),
    (["org/tiny"], lambda hub, run, mp: (run / "attnzoo.json").write_text(
        (run / "attnzoo.json").read_text().replace('"status": "done"', '"status": "training"')),
     "has not finished training"),
    (["org/tiny"], lambda hub, run, mp: (run / "README.md").write_text("# my own notes\n"),
     "README.md was not written by attnzoo"),
])
def test_push_mistakes_are_one_line_exit_2(hub, own_run, capsys, monkeypatch, args, setup, message):
    if setup is not None:
        setup(hub, own_run, monkeypatch)
    code, _, err = run_cli(capsys, "push", str(own_run), *args)
    assert one_line(code, err) and message in err, err
    assert not [c for c in hub.calls if c[0] == "create_commit"]


# --- the commands with a name -------------------------------------------------------------------------------------

def test_commands_take_a_run_by_name_and_never_write_into_the_cache(tiny_run, tiny_folder, hub_cache, tmp_path,
                                                                    capsys, monkeypatch):
    snapshot = cache_repo(hub_cache, "org/tiny", hub_files(tiny_run))
    before = sorted(p.name for p in snapshot.iterdir())
    image = str(images(tiny_folder)[0])
    code, out, _ = run_cli(capsys, "predict", image, "--run", "hf-hub:org/tiny", "--json")
    code_dir, out_dir, _ = run_cli(capsys, "predict", image, "--run", f"local-dir:{tiny_run}", "--json")
    assert code == code_dir == 0 and json.loads(out) == json.loads(out_dir)
    monkeypatch.chdir(tmp_path)
    code, _, _ = run_cli(capsys, "show-attention", image, "--run", "hf-hub:org/tiny")
    assert code == 0 and (tmp_path / "attention" / Path(image).name).is_file()  # ./attention, not the cache
    code, _, err = run_cli(capsys, "interpret", "hf-hub:org/tiny")
    assert code == 2 and "--data DIR" in err and "--out DIR" in err
    assert sorted(p.name for p in snapshot.iterdir()) == before


def test_export_hub_makes_the_face_of_an_older_run(own_run, tmp_path, capsys):
    for name in ("config.json", "README.md"):
        (own_run / name).unlink()
    code, _, _ = run_cli(capsys, "export", str(own_run), "--format", "hub", "--out", str(tmp_path / "repo"))
    copied = {p.name for p in (tmp_path / "repo").iterdir()}
    assert code == 0 and HUB_NAMES <= copied <= set(HUB_FILES)
    assert not (own_run / "config.json").exists()  # a new folder: the run folder is left as it is
    assert attnzoo.load_run(f"local-dir:{tmp_path / 'repo'}").classes == ["blue", "green", "red"]
    code, out, _ = run_cli(capsys, "export", str(own_run), "--format", "hub")
    assert code == 0 and "config.json" in out and (own_run / "README.md").read_text() == \
        (tmp_path / "repo" / "README.md").read_text()
    code, _, err = run_cli(capsys, "export", str(own_run), "--format", "hub", "--out", str(tmp_path / "repo"))
    assert code == 2 and "already holds files" in err


@pytest.mark.slow  # interpret's figures and scores: several seconds
def test_interpret_a_hub_repo_with_data_writes_only_into_out(tiny_run, tiny_folder, hub_cache, tmp_path, capsys):
    snapshot = cache_repo(hub_cache, "org/tiny", hub_files(tiny_run))
    before = sorted(p.name for p in snapshot.iterdir())
    code, out, err = run_cli(capsys, "interpret", "hf-hub:org/tiny", "--data", str(tiny_folder), "--out",
                             str(tmp_path / "explained"), "--n", "2", "--deletion-images", "3", "--road-images", "0",
                             "--sanity-images", "0", "--json")
    assert code == 0, err
    assert json.loads(out)["images"] == 12 and (tmp_path / "explained" / "report.html").is_file()
    assert sorted(p.name for p in snapshot.iterdir()) == before
