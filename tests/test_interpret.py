"""Grad-CAM, deletion curves, `attnzoo interpret` and `attnzoo compare` on tiny models and a tiny boxed folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import attnzoo
from attnzoo.cli import main
from attnzoo.errors import AttnzooError
from attnzoo.explain.boxes import load_boxes
from attnzoo.explain.cams import CAM_METHODS, cam, cam_methods, gradcam_site
from attnzoo.explain.compare import compare_runs
from attnzoo.explain.interpret import deletion_curves, gradcam, load_batch
from attnzoo.explain.metrics import confusion_matrix, curve_auc, most_confused, score_maps
from attnzoo.runs.folder import RunFolder

COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


class TwoRegions(nn.Module):
    """Site ``feat`` passes channels 0 and 1 of the input through; logits are +-(mean(A0) - mean(A1))."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Conv2d(3, 2, 1, bias=False)
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.feat.weight.zero_()
            self.feat.weight[0, 0] = self.feat.weight[1, 1] = 1.0
            self.head.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feat(x).mean((2, 3)))


def two_regions_input() -> torch.Tensor:
    """Channel 0 lit on the left 3 columns, channel 1 on the right 5, of a 4x8 image."""
    x = torch.zeros(1, 3, 4, 8)
    x[:, 0, :, :3] = 1.0
    x[:, 1, :, 3:] = 1.0
    return x


def test_gradcam_lights_up_where_the_class_evidence_is_and_nowhere_else():
    model, x = TwoRegions(), two_regions_input()
    # weights are the spatial means of the gradients: +-1/32 for the two channels; CAM = ReLU(A0 - A1) / 32
    cam0 = gradcam(model, x, target=0, site="feat")[0]
    expected = torch.zeros(4, 8)
    expected[:, :3] = 1 / 32
    torch.testing.assert_close(cam0, expected)
    cam1 = gradcam(model, x, target=1, site="feat")[0]
    assert (cam1[:, :3] == 0).all() and (cam1[:, 3:] > 0).all()
    torch.testing.assert_close(gradcam(model, x, site="feat"), cam1[None])  # predicted class: 1 (more pixels)


def test_gradcam_leaves_parameter_gradients_and_training_mode_alone():
    model = TwoRegions().train()
    gradcam(model, two_regions_input(), site="feat")
    assert model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("attn, at", [("lpa-pc", None), (None, None), ("softmask-sigmoid", "layer2")])
def test_a_cam_looks_at_the_last_feature_level_with_more_than_one_cell(attn, at):
    torch.manual_seed(0)
    model = attnzoo.create_model("test_resnet", attn, at=at, num_classes=3, img_size=32)
    assert gradcam_site(model, 32) == "layer3"  # layer4 is 1 x 1 at 32 px
    cam_map = gradcam(model, torch.randn(3, 3, 32, 32), target=[0, 1, 2])
    assert cam_map.shape == (3, 2, 2) and (cam_map >= 0).all()


def test_gradcam_reshapes_vit_tokens_to_their_grid_at_the_final_blocks_norm():
    torch.manual_seed(0)
    model = attnzoo.create_model("test_vit", None, num_classes=3)
    assert gradcam_site(model, 160) == "blocks.5.norm1"
    cam_map = gradcam(model, torch.randn(1, 3, 160, 160))
    assert cam_map.shape == (1, 10, 10) and cam_map.abs().sum() > 0


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_each_cam_equals_pytorch_grad_cam_called_directly_on_the_same_model_and_layer(method):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = attnzoo.create_model("test_resnet", "lpa-pc", num_classes=3, img_size=32).eval()
    x, targets = torch.randn(3, 3, 32, 32), [0, 1, 2]
    ours = cam(model, x, targets, method)
    direct = getattr(pytorch_grad_cam, CAM_METHODS[method].cls)(model=model, target_layers=[model.backbone.layer3])
    expected = direct(x, [ClassifierOutputTarget(t) for t in targets])
    np.testing.assert_allclose(scale_cam_image(ours.numpy(), (32, 32)), expected, atol=1e-4)


def test_an_all_zero_cam_stays_zero():
    model = TwoRegions()
    x = torch.zeros(1, 3, 4, 8)  # no evidence anywhere
    assert torch.equal(gradcam(model, x, target=0, site="feat"), torch.zeros(1, 4, 8))


def test_cam_methods_read_comma_lists_and_name_the_close_one():
    assert cam_methods(["gradcam,scorecam", "gradcam++", "gradcam"]) == ["gradcam", "scorecam", "gradcam++"]
    with pytest.raises(AttnzooError, match="did you mean 'gradcam'"):
        cam_methods("gradcma")


def test_deleting_the_pixels_a_map_points_at_first_is_faithful_when_the_class_rests_on_them():
    model, x = TwoRegions(), two_regions_input()
    left, right = torch.zeros(1, 4, 8), torch.zeros(1, 4, 8)
    left[:, :, :3], right[:, :, 3:] = 1.0, 1.0
    curves = deletion_curves(model, x, [1], {"evidence": right, "elsewhere": left}, steps=4)
    assert curves["evidence"].shape == (5,)
    assert curves["evidence"][0] == curves["elsewhere"][0] and curves["evidence"][-1] == curves["elsewhere"][-1]
    assert curve_auc(curves["evidence"]) < curve_auc(curves["elsewhere"])


def test_deletion_auc_is_the_mean_height_of_the_curve():
    assert curve_auc([0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert curve_auc([1.0, 0.0]) == pytest.approx(0.5)


def test_most_confused_lists_the_largest_off_diagonal_cells():
    cm = confusion_matrix([0, 0, 0, 1, 1, 2], [0, 1, 1, 2, 1, 2], 3)
    assert cm.tolist() == [[1, 2, 0], [0, 1, 1], [0, 0, 1]]
    assert most_confused(cm, ["a", "b", "c"]) == [("a", "b", 2), ("b", "c", 1)]


# --------------------------------------------------------------------------- runs on a tiny boxed folder


def make_boxed_folder(root: Path, per_class: dict[str, int], size: tuple[int, int] = (48, 40)) -> Path:
    """Three colour classes of a square on noise, images of ``size=(W, H)``, with boxes.csv."""
    rng = np.random.default_rng(0)
    w, h = size
    rows = ["image,x_min,y_min,x_max,y_max"]
    for split, count in per_class.items():
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
                x, y, side = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2)), h // 2
                img[y : y + side, x : x + side] = colour
                Image.fromarray(img).save(root / split / name / f"{i}.png")
                rows.append(f"{split}/{name}/{i}.png,{x},{y},{x + side},{y + side}")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    return root


def make_run(path: Path, data: Path, attn: str | None) -> Path:
    torch.manual_seed(0)
    model = attnzoo.create_model("test_resnet", attn, num_classes=3, img_size=32).eval()
    config = dict(backbone="test_resnet", attn=attn or "none", attn_options={}, sites=model.sites,
                  classes=sorted(COLOURS), img_size=32, mean=[0.5] * 3, std=[0.25] * 3, seed=0,
                  data=dict(root=str(data), layout="train/valid", classes=sorted(COLOURS),
                            counts={"train": dict.fromkeys(COLOURS, 1), "valid": dict.fromkeys(COLOURS, 2)}))
    history = [{"epoch": 1, "train_loss": 1.1, "valid_loss": 1.0, "accuracy": 0.4, "time": 3.0},
               {"epoch": 2, "train_loss": 1.0, "valid_loss": 0.9, "accuracy": 0.5, "time": 5.0}]
    return RunFolder(path).save(model, config, history)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> tuple[Path, Path, int, str]:
    data = make_boxed_folder(tmp_path_factory.mktemp("data"), {"train": 1, "valid": 2})
    run_dir = make_run(tmp_path_factory.mktemp("runs") / "lpa", data, "lpa-pc")
    with pytest.raises(SystemExit) as e:
        main(["interpret", str(run_dir), "--n", "2", "--deletion-images", "3"])
    return data, run_dir, e.value.code, ""


def test_interpret_writes_the_plots_and_the_report_into_the_run_folder(interpreted):
    _, run_dir, code, _ = interpreted
    assert code == 0
    for name in ("history.png", "confusion_matrix.png", "attention_gradcam.png", "top_losses.png", "deletion.png",
                 "insertion.png", "localization.png", "report.html"):
        assert (run_dir / name).is_file(), name
    with Image.open(run_dir / "attention_gradcam.png") as im:
        assert im.width > 1.5 * im.height  # image, three sites and Grad-CAM side by side, two rows


def test_report_html_is_one_self_contained_page(interpreted):
    _, run_dir, _, _ = interpreted
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 7
    assert 'src="http' not in page and "href=" not in page
    assert not re.search(r'src="(?!data:)', page)
    for words in ("test_resnet", "lpa-pc", "pointing game", "energy in box", "deletion AUC", "insertion AUC", "ROAD",
                  "MaxBoxAcc", "sanity ρ", "Grad-CAM at layer3", "Most confused"):
        assert words in page, words


def test_localisation_lands_in_attnzoo_json_next_to_everything_else(interpreted):
    _, run_dir, _, _ = interpreted
    config = json.loads((run_dir / "attnzoo.json").read_text())
    scores = config["localization"]["scores"]
    assert config["localization"]["images"] == 6 and config["localization"]["tolerance"] == 15
    assert set(scores) == {"layer1", "layer2", "layer3", "Grad-CAM at layer3", "random", "chance"}
    for key in ("pointing", "pointing_tolerance", "energy", "iou", "max_box_acc"):
        assert all(0 <= s[key] <= 1 for k, s in scores.items() if k != "chance"), key
    assert scores["layer1"]["kind"] == "tap" and scores["Grad-CAM at layer3"]["kind"] == "cam"
    faith = config["faithfulness"]
    maps = {"layer1", "layer2", "layer3", "Grad-CAM at layer3", "random"}
    assert set(faith["auc"]) == set(faith["insertion_auc"]) == set(faith["road"]["scores"]) == maps
    assert set(faith["sanity"]["rank_correlation"]) == maps - {"random"}
    assert config["backbone"] == "test_resnet" and len(config["metrics"]["per_epoch"]) == 2


def test_the_python_api_works_on_a_loaded_run_as_in_a_notebook(interpreted):
    data, run_dir, _, _ = interpreted
    run = attnzoo.load_run(run_dir)
    paths = sorted((data / "valid" / "red").glob("*.png"))
    x = load_batch(run, paths)
    cam = gradcam(run, x)
    probs, maps = run.predict(x)
    curves = deletion_curves(run, x, [run.classes.index("red")] * len(paths), {**maps, "Grad-CAM": cam}, steps=2)
    assert cam.shape == (2, 2, 2) and probs.shape == (2, 3)
    assert set(curves) == {"layer1", "layer2", "layer3", "Grad-CAM"}
    boxes = load_boxes(data, paths, run.img_size)
    assert score_maps({"Grad-CAM": cam}, boxes, run.img_size)["Grad-CAM"]["images"] == 2


def test_compare_prints_a_table_and_writes_a_bar_chart(interpreted, tmp_path, capsys):
    data, run_dir, _, _ = interpreted
    baseline = make_run(tmp_path / "base", data, None)
    code, out, _ = run_cli(capsys, "compare", str(run_dir), str(baseline), "--out", str(tmp_path / "c.png"))
    assert code == 0
    assert (tmp_path / "c.png").is_file()
    assert "lpa" in out and "base" in out and "runs" in out
    rows = compare_runs([run_dir, baseline])
    assert rows[0]["time_per_epoch"] == 4.0 and rows[0]["accuracy"] == 0.5
    assert rows[0]["params"] == sum(p.numel() for p in attnzoo.load_run(run_dir).model.parameters())
    assert rows[0]["best_site"] in ("layer1", "layer2", "layer3") and np.isnan(rows[1]["pointing"])
    assert rows[0]["best_cam"] == "Grad-CAM at layer3" and set(rows[0]["scores"]) >= {"layer1", "random", "chance"}


def test_interpret_without_boxes_skips_localisation(tmp_path, capsys):
    data = make_boxed_folder(tmp_path / "data", {"train": 1, "valid": 1})
    (data / "boxes.csv").unlink()
    run_dir = make_run(tmp_path / "r", data, "softmask-sigmoid")
    code, _, err = run_cli(capsys, "interpret", str(run_dir), "--out", str(tmp_path / "o"), "--n", "1",
                           "--deletion-images", "2")
    assert code == 0 and "localisation not scored" in err
    assert "localization" not in json.loads((run_dir / "attnzoo.json").read_text())
    assert "No <code>boxes.csv</code>" in (tmp_path / "o" / "report.html").read_text()


@pytest.mark.parametrize("command", ["interpret", "compare"])
def test_a_folder_that_is_not_a_run_is_one_line_and_exit_2(command, tmp_path, capsys):
    code, out, err = run_cli(capsys, command, str(tmp_path / "nope"))
    assert code == 2
    assert err.strip().count("\n") == 0 and "not a run folder" in err


def test_a_missing_data_folder_names_the_way_out(tmp_path, capsys):
    run_dir = make_run(tmp_path / "r", tmp_path / "gone", "lpa-pc")
    code, _, err = run_cli(capsys, "interpret", str(run_dir))
    assert code == 2 and "--data" in err


def test_interpret_json_carries_every_score_of_every_map_and_cam_method(tmp_path, capsys):
    data = make_boxed_folder(tmp_path / "data", {"train": 1, "valid": 1})
    run_dir = make_run(tmp_path / "r", data, "softmask-sigmoid")
    code, out, _ = run_cli(capsys, "interpret", str(run_dir), "--out", str(tmp_path / "o"), "--n", "1",
                           "--deletion-images", "2", "--cam", "gradcam,eigencam", "--cam", "layercam",
                           "--cam-at", "sites", "--road-images", "0", "--sanity-images", "2", "--json")
    assert code == 0
    result = json.loads(out)  # strict JSON: a score not measured is null
    table = result["table"]
    assert set(table) == {"layer3", "Grad-CAM at layer3", "Eigen-CAM at layer3", "LayerCAM at layer3", "random",
                          "chance"}
    assert table["layer3"]["kind"] == "gate" and table["Eigen-CAM at layer3"]["kind"] == "cam"
    for key in ("pointing", "pointing_tolerance", "energy", "iou", "max_box_acc", "deletion", "insertion"):
        assert table["layer3"][key] is not None, key
    assert table["layer3"]["road"] is None and table["layer3"]["sanity"] is not None
    assert isinstance(table["layer3"]["flags"], list)


def test_an_unknown_cam_method_is_one_line_and_exit_2(tmp_path, capsys):
    run_dir = make_run(tmp_path / "r", tmp_path / "gone", "lpa-pc")
    code, _, err = run_cli(capsys, "interpret", str(run_dir), "--cam", "gradcma")
    assert code == 2 and "did you mean 'gradcam'" in err


def test_in_short_names_the_best_map_per_score_from_the_table_and_flags_inverted_maps():
    from types import SimpleNamespace

    from attnzoo.explain.report import findings, score_table

    loc = {"scores": {
        "layer1": {"kind": "tap", "pointing": 0.003, "energy": 0.1},
        "layer3": {"kind": "tap", "pointing": 0.71, "energy": 0.5},
        "Grad-CAM at layer4": {"kind": "cam", "pointing": 0.73, "energy": 0.4},
        "random": {"kind": "random", "pointing": 0.24, "energy": 0.24},
        "chance": {"kind": "chance", "pointing": 0.237, "energy": 0.237},
    }}
    faith = {"auc": {"layer1": 0.74, "layer3": 0.30, "Grad-CAM at layer4": 0.35, "random": 0.39}}
    result = SimpleNamespace(accuracy=0.9, n_images=300, table=score_table(loc, faith))
    said = " ".join(findings(SimpleNamespace(classes=["a", "b", "c"]), result))
    assert "Best pointing game (higher is better): <b>Grad-CAM at layer4</b>, 0.730; random map 0.240" in said
    assert "Best energy in box (higher is better): <b>layer3</b>, 0.500" in said
    assert "Best deletion AUC (lower is better): <b>layer3</b>, 0.300; random map 0.390" in said
    assert "Inverted: <b>layer1</b>" in said and "Insensitive" not in said
    assert result.table["layer1"]["flags"] == ["inverted"] and result.table["layer3"]["flags"] == []


def test_a_readouts_cams_look_at_its_deepest_tap_where_the_decision_reads():
    torch.manual_seed(0)
    model = attnzoo.create_model("test_resnet", "lpa-pc", num_classes=3, img_size=64)  # layer4: 2 x 2
    assert gradcam_site(model, 64) == model.sites[-1] != "layer4"
    x = torch.randn(4, 3, 64, 64)
    assert cam(model, x, torch.tensor([0, 1, 2, 0])).abs().max() > 1e-8  # not the final level's rounding noise
    final = cam(model, x, torch.tensor([0, 1, 2, 0]), layer="layer4")
    assert final.abs().max() < 1e-6  # there, softmax cancels g: gradients of rounding size
