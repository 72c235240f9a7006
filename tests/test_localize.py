"""Localisation scores on hand-made maps whose answers are known, and boxes.csv read and scaled."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from attnzoo.explain.boxes import load_boxes, scale_box
from attnzoo.explain.metrics import (
    ImageBoxes,
    box_area_fraction,
    energy_in_box,
    pointing_game,
    random_baseline,
    random_maps,
    score_maps,
)

SIZE = 64
BOX = (0, 0, 32, 32)  # the top-left quarter of a 64x64 image


def peak(row: int, col: int, size: int = 8) -> torch.Tensor:
    m = torch.zeros(size, size)
    m[row, col] = 1.0
    return m


def test_a_map_peaked_inside_the_box_points_into_it_with_most_energy_there():
    m = peak(1, 1)
    assert pointing_game(m, BOX, SIZE)
    assert energy_in_box(m, BOX, SIZE) > 0.99


def test_a_map_peaked_outside_the_box_misses_it():
    m = peak(6, 6)
    assert not pointing_game(m, BOX, SIZE)
    assert energy_in_box(m, BOX, SIZE) < 0.01


def test_a_uniform_map_spreads_its_energy_like_the_box_area_and_points_nowhere():
    m = torch.full((8, 8), 3.0)
    assert energy_in_box(m, BOX, SIZE) == pytest.approx(0.25)
    assert energy_in_box(m, (8, 0, 40, 64), SIZE) == pytest.approx(0.5)
    assert not pointing_game(m, (0, 0, 64, 64), SIZE)


def test_energy_ignores_a_constant_offset_and_scale():
    m = peak(1, 1) - 5.0
    assert energy_in_box(m, BOX, SIZE) == pytest.approx(energy_in_box(3 * peak(1, 1), BOX, SIZE))


def test_the_random_baseline_is_the_box_area_and_sampled_maps_come_close():
    boxes = [ImageBoxes((BOX,)), ImageBoxes(((0, 0, 64, 32),))]
    assert box_area_fraction(BOX, SIZE) == 0.25
    assert random_baseline(boxes, SIZE) == {"pointing": 0.375, "pointing_tolerance": 0.375, "energy": 0.375}
    maps = random_maps(200, (8, 8), seed=0)
    assert torch.equal(maps, random_maps(200, (8, 8), seed=0))
    scores = score_maps({"random": maps}, [BOX] * 200, SIZE)["random"]
    assert scores["energy"] == pytest.approx(0.25, abs=0.03)
    assert scores["pointing"] == pytest.approx(0.25, abs=0.08)


def test_score_maps_averages_over_the_images_with_a_box():
    maps = {"site": torch.stack([peak(1, 1), peak(6, 6), peak(6, 6)])}
    scores = score_maps(maps, [BOX, BOX, None], SIZE)
    assert scores["site"]["pointing"] == 0.5
    assert scores["site"]["images"] == 2


def test_boxes_scale_with_the_squash_to_the_model_size():
    assert scale_box((10, 20, 50, 60), from_size=(100, 200), to_size=(50, 50)) == (5, 5, 25, 15)


def test_load_boxes_reads_boxes_csv_and_scales_each_box_to_the_model_size(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (100, 50)).save(tmp_path / "a" / "wide.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "a" / "unboxed.png")
    (tmp_path / "boxes.csv").write_text("image,x_min,y_min,x_max,y_max\na/wide.png,10,5,60,25\n")
    boxes = load_boxes(tmp_path, [tmp_path / "a" / "wide.png", tmp_path / "a" / "unboxed.png"], 20)
    assert boxes == [ImageBoxes(((2.0, 2.0, 12.0, 10.0),), px=(5.0, 2.5)), None]


def test_boxes_csv_may_give_an_image_several_boxes_one_row_each(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "two.png")
    (tmp_path / "boxes.csv").write_text("image,x_min,y_min,x_max,y_max\ntwo.png,0,0,4,4\ntwo.png,20,20,40,40\n")
    assert load_boxes(tmp_path, [tmp_path / "two.png"], 20) == [ImageBoxes(((0, 0, 2, 2), (10, 10, 20, 20)), (2, 2))]
