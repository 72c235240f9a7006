"""What attnzoo writes outside run folders never replaces a file it did not create in that call."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
from PIL import Image

from attnzoo.cli import main
from attnzoo.errors import AttnzooError
from attnzoo.runs.outputs import per_image_outputs, write_new


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def photos(tiny_folder: Path, tmp_path: Path) -> list[Path]:
    """Two copies of one validation image with the same file name in different folders."""
    src = sorted((tiny_folder / "valid" / "red").glob("*.png"))[0]
    out = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        out.append(tmp_path / folder / "x.png")
        out[-1].write_bytes(src.read_bytes())
    return out


def test_show_attention_into_the_inputs_folder_is_refused_and_inputs_survive(tiny_run, photos, capsys):
    before = [digest(p) for p in photos]
    code, _, err = run_cli(capsys, "show-attention", str(photos[0]), "--run", str(tiny_run),
                           "--out", str(photos[0].parent))
    assert code == 2 and "input image" in err and len(err.strip().splitlines()) == 1
    assert [digest(p) for p in photos] == before


def test_same_file_name_in_two_folders_gives_two_outputs(tiny_run, photos, capsys, tmp_path):
    out = tmp_path / "figs"
    code, stdout, _ = run_cli(capsys, "show-attention", *map(str, photos), "--run", str(tiny_run), "--out", str(out))
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["x-2.png", "x.png"]


def test_out_file_that_exists_is_refused_untouched(tiny_run, photos, capsys, tmp_path):
    target = tmp_path / "mine.png"
    Image.new("RGB", (4, 4)).save(target)
    before = digest(target)
    code, _, err = run_cli(capsys, "show-attention", str(photos[0]), "--run", str(tiny_run), "--out", str(target))
    assert code == 2 and "already exists" in err
    assert digest(target) == before
    code, _, err = run_cli(capsys, "show-attention", str(photos[0]), "--run", str(tiny_run), "--out",
                           str(photos[0]))
    assert code == 2 and digest(photos[0]) == digest(photos[1])


def test_a_taken_name_in_the_output_folder_moves_on(tiny_run, photos, capsys, tmp_path):
    out = tmp_path / "figs"
    out.mkdir()
    (out / "x.png").write_bytes(b"the user's own file")
    code, _, _ = run_cli(capsys, "show-attention", str(photos[0]), "--run", str(tiny_run), "--out", str(out))
    assert code == 0
    assert (out / "x.png").read_bytes() == b"the user's own file"
    with Image.open(out / "x-2.png") as im:
        assert im.width > 100


def test_several_images_into_one_png_name_is_refused(tiny_run, photos):
    with pytest.raises(AttnzooError, match="one file, for one image"):
        per_image_outputs(photos, photos[0].parent.parent / "one.png", tiny_run / "attention")


def test_write_new_never_replaces_a_file_that_appears_meanwhile(tmp_path):
    target = tmp_path / "chart.png"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"attnzoo's")
        target.write_bytes(b"someone else's")  # appears between the choice of name and the write

    assert write_new(target, write) == tmp_path / "chart-2.png"
    assert target.read_bytes() == b"someone else's"
    with pytest.raises(AttnzooError, match="already exists"):
        write_new(tmp_path / "other.png", lambda tmp: (tmp.write_bytes(b"x"), (tmp_path / "other.png").touch()),
                  fresh=False)
    assert (tmp_path / "other.png").read_bytes() == b""
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_concurrent_writers_of_one_name_both_keep_their_file(tmp_path):
    target = tmp_path / "fig.png"
    barrier = threading.Barrier(2)
    results = []

    def write(tmp: Path, payload: bytes) -> None:
        tmp.write_bytes(payload)
        barrier.wait()

    threads = [threading.Thread(target=lambda b=b: results.append(write_new(target, lambda t: write(t, b))))
               for b in (b"one", b"two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.read_bytes() for p in results) == [b"one", b"two"]


def test_interpret_into_a_folder_holding_files_is_refused(tiny_run, capsys, tmp_path):
    (tmp_path / "report.html").write_text("my own report")
    code, _, err = run_cli(capsys, "interpret", str(tiny_run), "--out", str(tmp_path))
    assert code == 2 and "already holds files" in err
    assert (tmp_path / "report.html").read_text() == "my own report"


def test_compare_never_writes_over_a_chart(tiny_run, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("compare.png").write_bytes(b"an older chart of mine")
    code, _, err = run_cli(capsys, "compare", str(tiny_run), "--out", "compare.png")
    assert code == 2 and "already exists" in err
    code, out, _ = run_cli(capsys, "compare", str(tiny_run))
    assert code == 0 and Path("compare-2.png").is_file()
    assert Path("compare.png").read_bytes() == b"an older chart of mine"
