"""Each built-in module against the formula of its paper, and the conformance kit."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnzoo
from attnzoo.attention import sagan
from attnzoo.attention.sagan import SelfAttention, naive_self_attention, received_attention
from attnzoo.model.maps import MapRecorder
from attnzoo.testing import check_attention


@pytest.mark.parametrize("name", ["lpa-pc", "lpa-dp", "sagan", "softmask-sigmoid", "softmask-softmax"])
def test_builtin_passes_the_conformance_kit(name):
    assert check_attention(name)


@pytest.mark.parametrize("backend", ["chunked", "sdpa"])
@pytest.mark.parametrize("channels,hw", [(64, (6, 5)), (24, (4, 4)), (10, (3, 7))])
def test_sagan_equals_the_naive_formula(channels, hw, backend, monkeypatch):
    monkeypatch.setattr(sagan, "CHUNK_ELEMS", 2 * 7)  # several chunks, a ragged last one
    torch.manual_seed(0)
    m = SelfAttention(channels, backend=backend)
    with torch.no_grad():
        m.gamma.fill_(0.7)
    x = torch.randn(2, channels, *hw, requires_grad=True)
    rec = MapRecorder()
    rec.watch("s", m)
    y = m(x)
    ref, ref_map = naive_self_attention(m, x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rec.evaluate()["s"], ref_map, atol=1e-6, rtol=1e-4)
    g1 = torch.autograd.grad(y.square().sum(), [x, m.query.weight, m.value.weight])
    g2 = torch.autograd.grad(ref.square().sum(), [x, m.query.weight, m.value.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_sagan_starts_as_the_identity():
    x = torch.randn(1, 16, 5, 5)
    assert torch.equal(SelfAttention(16)(x), x)


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", ["chunked", "sdpa"])
def test_sagan_never_builds_the_n_by_n_matrix(backend, monkeypatch):
    monkeypatch.setattr(sagan, "CHUNK_ELEMS", 1 << 16)  # chunks of 64 queries
    n = 32 * 32
    m = SelfAttention(32, backend=backend)
    with torch.no_grad():
        m.gamma.fill_(1.0)
    x = torch.randn(1, 32, 32, 32, requires_grad=True)
    with LargestTensor() as probe:
        m(x).sum().backward()
    assert probe.largest < n * n // 8, f"a tensor of {probe.largest} elements (N^2 = {n * n})"
    with LargestTensor() as naive:
        naive_self_attention(m, x)[0].sum().backward()
    assert naive.largest >= n * n  # the probe does see an N x N matrix when one is built


def test_received_attention_is_chunked_without_changing_the_result():
    q, k = torch.randn(2, 50, 4), torch.randn(2, 50, 4)
    full = torch.softmax(q @ k.transpose(1, 2), -1).mean(1)
    torch.testing.assert_close(received_attention(q, k, chunk_elems=7 * 2 * 50), full)


def lpa_by_hand(m, locals_, g):
    """Jetley et al. eq. (1)-(3) for project='g', concat, softmax, written per position."""
    feats = []
    for tap, l in zip(m.taps, locals_):
        gp = tap.proj.weight @ g[0]  # [C]
        l = l[0].flatten(1)  # [C, N]
        if tap.u is not None:
            u = tap.u.weight.view(-1)
            c = torch.stack([u @ (l[:, i] + gp) for i in range(l.shape[1])])
        else:
            c = torch.stack([l[:, i] @ gp for i in range(l.shape[1])])
        a = torch.exp(c - c.max()) / torch.exp(c - c.max()).sum()
        feats.append(sum(a[i] * l[:, i] for i in range(l.shape[1])))
    return m.classifier(torch.cat(feats))[None]


@pytest.mark.parametrize("name", ["lpa-pc", "lpa-dp"])
def test_lpa_follows_the_paper(name):
    torch.manual_seed(0)
    m = attnzoo.create_attention(name, [4, 6], 5, 3)
    locals_ = [torch.randn(1, 4, 3, 2), torch.randn(1, 6, 2, 2)]
    g = torch.randn(1, 5)
    torch.testing.assert_close(m(locals_, g), lpa_by_hand(m, locals_, g), atol=1e-5, rtol=1e-5)


def test_lpa_dp_has_no_compatibility_parameters():
    pc = attnzoo.create_attention("lpa-pc", [8], 8, 3)
    dp = attnzoo.create_attention("lpa-dp", [8], 8, 3)
    assert all(t.u is None for t in dp.taps) and all(t.u is not None for t in pc.taps)


def test_lpa_indep_averages_one_classifier_per_tap():
    torch.manual_seed(0)
    m = attnzoo.create_attention("lpa-pc", [4, 4], 4, 3, agg="indep")
    locals_ = [torch.randn(2, 4, 3, 3), torch.randn(2, 4, 2, 2)]
    g = torch.randn(2, 4)
    attended = []
    for tap, l in zip(m.taps, locals_):
        l2, c = tap(l, g)
        attended.append((torch.softmax(c, 1)[:, None] * l2.flatten(2)).sum(-1))
    expected = (m.classifier[0](attended[0]) + m.classifier[1](attended[1])) / 2
    torch.testing.assert_close(m(locals_, g), expected)


def test_lpa_sigmoid_norm_takes_the_spatial_mean():
    torch.manual_seed(0)
    m = attnzoo.create_attention("lpa-dp", [4], 4, 2, norm="sigmoid")
    l, g = torch.randn(1, 4, 3, 3), torch.randn(1, 4)
    _, c = m.taps[0](l, g)
    g_a = (torch.sigmoid(c)[:, None] * l.flatten(2)).mean(-1)
    torch.testing.assert_close(m([l], g), m.classifier(g_a))


def test_lpa_project_l_lifts_locals_to_the_global_width():
    m = attnzoo.create_attention("lpa-pc", [4, 8], 32, 3, project="l")
    assert m.classifier.in_features == 64
    assert m([torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)], torch.randn(2, 32)).shape == (2, 3)


def test_softmask_sigmoid_gates_each_position_between_0_and_1():
    m = attnzoo.create_attention("softmask-sigmoid", 8)
    rec = MapRecorder()
    rec.watch("m", m)
    x = torch.randn(2, 8, 5, 6)
    y = m(x)
    gate = rec.evaluate()["m"]
    assert gate.shape == (2, 5, 6) and ((gate > 0) & (gate < 1)).all()
    torch.testing.assert_close(y, x * gate[:, None])


def test_softmask_softmax_gate_has_mean_one():
    m = attnzoo.create_attention("softmask-softmax", 8, hidden=4)
    rec = MapRecorder()
    rec.watch("m", m)
    m(torch.randn(3, 8, 5, 6))
    gate = rec.evaluate()["m"]
    torch.testing.assert_close(gate.mean((1, 2)), torch.ones(3))


def test_sagan_output_keeps_the_input_memory_format():
    gate = attnzoo.create_attention("sagan", 16).eval()
    x = torch.randn(2, 16, 6, 5)
    assert gate(x).is_contiguous()  # NCHW in, NCHW out: the layers after the gate keep their layout
    xl = x.contiguous(memory_format=torch.channels_last)
    assert gate(xl).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["lpa-pc", "lpa-dp", "sagan", "softmask-sigmoid", "softmask-softmax"])
def test_scores_and_softmax_run_in_float32_under_autocast(name, dtype):
    """Large activations: in fp16 their dot products overflow (inf, then NaN in the softmax)."""
    torch.manual_seed(0)
    if name.startswith("lpa"):
        m = attnzoo.create_attention(name, [32, 32], 32, 5).eval()
        inputs = ([torch.randn(2, 32, 6, 5) * 300, torch.randn(2, 32, 3, 3) * 300], torch.randn(2, 32) * 300)
    else:
        m = attnzoo.create_attention(name, 32).eval()
        inputs = (torch.randn(2, 32, 6, 5) * 300,)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        rec = MapRecorder()
        rec.watch("m", m)
        want = m(*inputs)
        want_map = rec.evaluate()["m"]
        with torch.autocast("cpu", dtype=dtype):
            got = m(*inputs)
            got_map = rec.evaluate()["m"]
    assert torch.isfinite(got).all()
    scale = want.abs().max()
    torch.testing.assert_close(got.float() / scale, want / scale, atol=2e-2, rtol=0)
    for a, b in zip(got_map if isinstance(got_map, list) else [got_map],
                    want_map if isinstance(want_map, list) else [want_map]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b, atol=2e-2, rtol=0)


class KeepsAClosure(torch.nn.Module):
    """A gate that keeps its last map as a lambda on itself: it cannot be pickled after a forward."""

    attnzoo_kind = "gate"
    attnzoo_summary = "test gate keeping a closure"

    def __init__(self, channels: int):
        super().__init__()
        self.score = torch.nn.Conv2d(channels, 1, 1)

    def forward(self, x):
        m = torch.sigmoid(self.score(x))
        self.last = lambda: m[:, 0]
        attnzoo.report_map(self, self.last)
        return x * m


def test_the_kit_refuses_a_module_that_cannot_be_pickled_after_a_forward():
    with pytest.raises(AssertionError, match="pickle after a forward fails"):
        check_attention(KeepsAClosure)
