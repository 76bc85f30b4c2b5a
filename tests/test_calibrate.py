"""calibrate_norms: the fitted factor folds into the weight (and running_var) so that an Lp layer normalizes its
activations as its L2 counterpart; layer by layer in forward order; the calibration is in the state_dict."""

import copy

import pytest
import torch
from torch import nn

import normmatters as nm


class Net(nn.Module):  # the acceptance network: two layer norms behind two outlier features
    def __init__(self):
        super().__init__()
        self.a, self.na, self.b, self.nb = nn.Linear(16, 64), nn.LayerNorm(64), nn.Linear(64, 64), nn.LayerNorm(64)

    def forward(self, x):
        h = self.a(x)
        h = h + torch.zeros_like(h).index_fill_(1, torch.tensor([0, 1]), 25.0) * h.abs()
        return self.nb(self.b(torch.relu(self.na(h))))


def _drift(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("norm, method", [("linf", "lstsq"), ("topk", "median")])
def test_drift_halves_and_the_state_dict_keeps_it(norm, method):
    torch.manual_seed(0)
    net = Net().eval()
    data, test = [torch.randn(64, 16) for _ in range(4)], torch.randn(128, 16)
    with torch.no_grad():
        y0 = net(test)
        c = nm.convert_norms(copy.deepcopy(net), norm=norm).eval()
        before = _drift(c(test), y0)
        report = nm.calibrate_norms(c, data, method=method)
        after = _drift(c(test), y0)
        assert after < 0.5 * before
        assert [r.name for r in report] == ["na", "nb"] and all(r.calibrated for r in report)
        assert all(r.drift_after < r.drift_before for r in report)
        assert "na" in str(report) and "drift before" in str(report)
        fresh = nm.convert_norms(copy.deepcopy(net), norm=norm).eval()
        fresh.load_state_dict(c.state_dict())
        torch.testing.assert_close(fresh(test), c(test))
        again = nm.calibrate_norms(c, data, method=method)  # refits (the factor applied before is undone first)
        torch.testing.assert_close(fresh(test), c(test), atol=1e-5, rtol=1e-4)
        assert again[0].drift_before == pytest.approx(report[0].drift_after, rel=1e-5)


def _scaled_copies(pattern, n):  # every unit sees the same shape up to scale: one factor fits exactly
    return [pattern * s for s in torch.linspace(0.5, 3.0, n)]


@pytest.mark.parametrize("make, pattern", [
    (lambda norm: nm.LpLayerNorm(8, norm=norm, eps=1e-12), lambda: torch.randn(1, 8).repeat(5, 1)),
    (lambda norm: nm.LpRMSNorm(8, norm=norm, eps=1e-12), lambda: torch.randn(1, 8).repeat(5, 1)),
    (lambda norm: nm.LpGroupNorm(2, 4, norm=norm, eps=1e-12), lambda: torch.randn(1, 2, 6).repeat(1, 2, 1)),
])
def test_a_uniform_ratio_is_fitted_exactly(make, pattern):
    torch.manual_seed(2)
    pattern = pattern()
    lp, l2 = make("linf"), make("l2")
    with torch.no_grad():
        lp.weight.uniform_(0.5, 2.0)
        l2.weight.copy_(lp.weight)
    x = torch.cat(_scaled_copies(pattern, 3))
    report = nm.calibrate_norms(nn.Sequential(lp), [x])
    assert report[0].factor != pytest.approx(1.0, abs=1e-3)
    assert report[0].drift_after < 1e-5
    torch.testing.assert_close(lp(x), l2(x), atol=1e-5, rtol=1e-5)


def test_batch_norm_per_channel_training_and_eval_consistent():
    torch.manual_seed(3)
    ref = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2), ref.bias.uniform_(-1, 1), ref.running_var.uniform_(0.5, 2)
    lp = nm.convert_batchnorm(copy.deepcopy(ref), norm="range").eval()
    x = torch.randn(8, 3, 4, 4).exp()  # skewed channels: the range constant is off
    with torch.no_grad():
        eval_before = lp(x)
        report = nm.calibrate_norms(nn.Sequential(lp), [x])
        assert report[0].factors is not None and report[0].factors.shape == (3,)
        torch.testing.assert_close(lp(x), eval_before, atol=1e-4, rtol=1e-4)  # eval: f·w / sqrt(f²·rv + eps)
        lp.train(), ref.train()
        torch.testing.assert_close(lp(x), ref(x), atol=1e-4, rtol=1e-4)  # one batch: its own σ̂ ratio, exact
    assert lp.training  # the mode it had


def test_forward_order_batches_forms_and_skips():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nm.LpLayerNorm(6, norm="l1")
            self.free = nm.LpLayerNorm(6, norm="l1", elementwise_affine=False)
            self.early = nm.LpLayerNorm(6, norm="l1")
            self.same = nm.LpLayerNorm(6, norm="l2")
            self.unused = nm.LpRMSNorm(6, norm="l1")

        def forward(self, x, scale=1.0):
            return self.late(self.same(self.free(self.early(x * scale).exp())))

    torch.manual_seed(4)
    m = M().train()
    xs = [torch.randn(4, 6) for _ in range(3)]
    for batches in ([(x,) for x in xs], [{"x": x, "scale": 2.0} for x in xs]):
        report = nm.calibrate_norms(m, iter(batches), max_batches=2)
        assert [r.name for r in report] == ["early", "free", "late", "unused"]
        assert [r.calibrated for r in report] == [True, False, True, False]
        assert "affine" in report[1].reason and "not reached" in report[3].reason
    assert m.training
    with pytest.raises(ValueError, match="empty"):
        nm.calibrate_norms(m, [])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        nm.calibrate_norms("m", xs)
    with pytest.raises(ValueError, match="method"):
        nm.calibrate_norms(m, xs, method="mean")


def test_hugging_face_gemma_with_keyword_batches():
    T = pytest.importorskip("transformers", reason="calibrating a Hugging Face model needs transformers")
    T.logging.set_verbosity_error()
    torch.manual_seed(5)
    m = T.GemmaForCausalLM(T.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    ids = [torch.randint(0, 64, (2, 12)) for _ in range(3)]
    with torch.no_grad():
        for mod in m.modules():
            if "RMSNorm" in type(mod).__name__:
                mod.weight.uniform_(-0.5, 0.5)
        c = nm.convert_norms(copy.deepcopy(m), norm="linf")
        w0 = c.model.norm.weight.clone()
        report = nm.calibrate_norms(c, [{"input_ids": i} for i in ids])
        assert [r.name for r in report][-1] == "model.norm"
        assert len(report) == 3 and all(r.calibrated and r.drift_after < r.drift_before for r in report)
        torch.testing.assert_close(1 + c.model.norm.weight, (1 + w0) * report[-1].factor)  # Gemma's 1 + weight
