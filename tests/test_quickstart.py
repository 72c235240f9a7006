"""The README's quick start, as written, on a small copy of the demo set: the run folder it makes, the order
of its maps, and the show-attention command after it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from attnzoo.cli import main
from attnzoo.train.demo import make_demo

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_command(name: str) -> list[str]:
    """The first command line of the README's set-up section that runs ``attnzoo NAME`` (its quick start)."""
    text = README.read_text()
    for line in text[text.index("## Set up on a fresh machine"):].splitlines():
        words = shlex.split(line.strip()) if line.startswith("    attnzoo ") else []
        if words[:2] == ["attnzoo", name]:
            return words[1:]
    raise AssertionError(f"no 'attnzoo {name}' command in the README")


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_the_readme_quick_start_trains_and_shows_where_it_looks(tmp_path, capsys):
    fit = readme_command("fit")
    assert option(fit, "--data") == "demo" and "--no-pretrained" in fit
    data = make_demo(tmp_path / "demo", n_train=36, n_valid=18)  # the demo set, small
    fit[fit.index("--data") + 1] = str(data)
    fit[fit.index("--epochs") + 1] = "1"
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main([*fit, "--img-size", "64", "--out", str(run)])  # (64 px is what --data demo implies)
    assert e.value.code == 0
    for name in ("attnzoo.json", "model.safetensors", "history.csv", "attention.png", "top_losses.png"):
        assert (run / name).is_file(), name
    config = json.loads((run / "attnzoo.json").read_text())
    assert config["status"] == "done" and config["backbone"] == option(fit, "--backbone")
    shares = [v["share"] for v in config["maps"].values()]
    assert set(config["maps"]) == set(config["sites"]) and shares == sorted(shares, reverse=True)
    assert all("pointing" in v for v in config["maps"].values())  # the demo has boxes

    show = readme_command("show-attention")
    image = Path(show[1].replace("~/.cache/attnzoo/demo-v1-seed0", str(data)))
    assert image.is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["show-attention", str(image), "--run", str(run), "--out", str(tmp_path / "fig.png")])
    assert e.value.code == 0 and (tmp_path / "fig.png").is_file()
