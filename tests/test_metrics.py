"""attnzoo.metrics on hand-made maps, boxes and curves whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnzoo.explain.metrics import (
    ImageBoxes,
    box_ious,
    curve_auc,
    energy_in_box,
    flags,
    mask_iou,
    max_box_acc,
    pointing_game,
    random_baseline,
    rank_correlation,
    score_maps,
    spearman,
)

SIZE = 64
BOX = (0, 0, 32, 32)  # the top-left quarter of a 64 x 64 image


def peak(row: int, col: int, size: int = 8) -> torch.Tensor:
    m = torch.zeros(size, size)
    m[row, col] = 1.0
    return m


def test_pointing_with_a_tolerance_hits_a_peak_just_outside_the_box():
    m = peak(0, 5)  # cell centre (44, 4): 12 px right of the box
    assert not pointing_game(m, BOX, SIZE)
    assert pointing_game(m, BOX, SIZE, tolerance=15)
    assert not pointing_game(m, BOX, SIZE, tolerance=11)


def test_the_tolerance_is_in_pixels_of_the_original_image():
    m = peak(0, 5)  # 12 px right of the box here, 24 px in an original twice as wide
    assert not pointing_game(m, BOX, SIZE, tolerance=15, px=(2.0, 1.0))
    assert pointing_game(m, BOX, SIZE, tolerance=15, px=(1.0, 3.0))  # the offset is horizontal only


def test_a_hit_in_any_of_several_boxes_counts():
    m = peak(6, 6)  # cell centre (52, 52)
    assert not pointing_game(m, [BOX], SIZE)
    assert pointing_game(m, [BOX, (48, 48, 64, 64)], SIZE)


def test_energy_is_the_share_of_the_mass_in_the_boxes():
    m = torch.zeros(SIZE, SIZE)
    m[:32, :32], m[32:, 32:] = 1.0, 3.0  # masses 1024 and 3072
    assert energy_in_box(m, BOX, SIZE) == pytest.approx(0.25)
    assert energy_in_box(m, [BOX, (32, 32, 64, 64)], SIZE) == pytest.approx(1.0)
    assert energy_in_box(m, (0, 0, 64, 16), SIZE) == pytest.approx(0.125)  # 512 of 4096


def test_an_all_zero_map_has_no_energy_in_the_box_and_points_nowhere():
    m = torch.zeros(8, 8)
    assert energy_in_box(m, BOX, SIZE) == 0.0
    assert not pointing_game(m, BOX, SIZE)
    assert mask_iou(m, BOX, SIZE) == 0.0 and (box_ious(m, BOX, SIZE) == 0).all()


def test_iou_of_the_thresholded_map_with_the_box():
    m = torch.zeros(SIZE, SIZE)
    m[:32, :16] = 1.0  # the left half of the box: 512 of its 1024 pixels
    assert mask_iou(m, BOX, SIZE) == pytest.approx(0.5)
    m[32:48, :32] = 1.0  # and 512 pixels below it: intersection 512, union 1536
    assert mask_iou(m, BOX, SIZE) == pytest.approx(1 / 3)


def test_the_box_around_the_pixels_above_a_threshold():
    m = torch.zeros(SIZE, SIZE)
    m[:32, :16] = 1.0
    m[40:44, 40:44] = 0.5  # a weaker blob: boxed with the strong one below 0.5, left out above
    ious = box_ious(m, BOX, SIZE, thresholds=(0.25, 0.75))
    # at 0.25 the box is (0, 0, 44, 44): IoU 1024 / 1936; at 0.75 it is (0, 0, 16, 32): IoU 512 / 1024
    np.testing.assert_allclose(ious, [1024 / 1936, 0.5])


def test_max_box_acc_is_the_best_thresholds_share_of_images_with_iou_at_least_half():
    ious = np.array([[0.5, 0.2], [0.6, 0.9], [0.1, 0.3]])  # threshold 0: 2 of 3 hit, threshold 1: 1 of 3
    assert max_box_acc(ious) == (pytest.approx(2 / 3), 0)
    assert max_box_acc(ious, iou=0.8) == (pytest.approx(1 / 3), 1)


def test_score_maps_gives_every_score_over_the_images_with_boxes():
    m = torch.zeros(3, SIZE, SIZE)
    m[0, :32, :32] = 1.0  # exactly the box
    m[1, 40:, 40:] = 1.0  # elsewhere
    scores = score_maps({"site": m}, [ImageBoxes((BOX,)), ImageBoxes((BOX,)), None], SIZE, tolerance=15)["site"]
    assert scores["images"] == 2
    assert scores["pointing"] == 0.5 and scores["energy"] == 0.5 and scores["iou"] == 0.5
    assert scores["max_box_acc"] == 0.5 and scores["flat"] == 0.0  # the all-zero third map has no box


def test_score_maps_counts_the_constant_maps_which_point_nowhere():
    m = torch.zeros(2, 8, 8)
    m[0, 1, 1] = 1.0
    assert score_maps({"cam": m}, [ImageBoxes((BOX,))] * 2, SIZE)["cam"]["flat"] == 0.5


def test_the_random_baseline_grows_with_the_tolerance():
    boxes = [ImageBoxes(((0, 0, 32, 64),))]  # the left half: pixels within 8 px are the 40 left columns
    assert random_baseline(boxes, SIZE, tolerance=8) == {"pointing": 0.5, "pointing_tolerance": 0.625,
                                                         "energy": 0.5}


def test_spearman_correlates_ranks_with_ties_at_their_mean_rank():
    assert spearman(np.array([[1, 2], [3, 4]]), np.array([[10, 20], [30, 40]])) == pytest.approx(1.0)
    assert spearman(np.array([[1, 2], [3, 4]]), np.array([[4, 3], [2, 1]])) == pytest.approx(-1.0)
    # ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5)
    assert spearman(np.array([[1, 1], [2, 3]]), np.array([[1, 2], [3, 4]])) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(spearman(np.ones((2, 2)), np.array([[1, 2], [3, 4]])))


def test_rank_correlation_averages_over_images_skipping_constant_maps():
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]])
    b = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[4.0, 3.0], [2.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]]])
    assert rank_correlation(a, b) == pytest.approx(0.0)  # +1 and -1; the constant map is skipped


def test_flags_name_inverted_and_insensitive_maps():
    assert flags({"pointing": 0.05, "sanity": 0.1}, chance_pointing=0.25) == ["inverted"]
    assert flags({"pointing": 0.2, "sanity": 0.8}, chance_pointing=0.25) == ["insensitive"]
    assert flags({"pointing": 0.2, "sanity": 0.49}, chance_pointing=0.25) == []
    assert flags({"pointing": math.nan}, chance_pointing=0.25) == []
    assert flags({"pointing": 0.0, "flat": 1.0}, chance_pointing=0.25) == ["flat"]  # points nowhere, not away


def test_curve_auc_is_the_mean_height_of_the_curve():
    assert curve_auc([0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert curve_auc([1.0, 0.0]) == pytest.approx(0.5)
    assert curve_auc([0.0, 1.0, 1.0]) == pytest.approx(0.75)


def test_a_map_of_rounding_noise_points_nowhere():
    noise = torch.zeros(1, 2, 2)
    noise[0, 1, 1] = 1e-16  # a CAM at a layer that reaches the logits only through rounding
    assert score_maps({"cam": noise}, [ImageBoxes((BOX,))], SIZE)["cam"]["flat"] == 1.0
