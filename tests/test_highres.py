import numpy as np
import pytest
import torch
from torch import nn

from brnpa_triton.highres import make_high_resolution


class Basic(nn.Module):
    """torchvision-like BasicBlock (stride on conv1) or Bottleneck-like (stride on conv2)."""

    def __init__(self, cin, cout, stride=1, bottleneck=False, avg_down=False):
        super().__init__()
        s1, s2 = (1, stride) if bottleneck else (stride, 1)
        self.conv1 = nn.Conv2d(cin, cout, 3, s1, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, s2, 1, bias=False)
        self.downsample = None
        if stride != 1 or cin != cout:
            layers = [nn.AvgPool2d(stride, stride), nn.Conv2d(cin, cout, 1, bias=False)] if avg_down else [
                nn.Conv2d(cin, cout, 1, stride, bias=False)
            ]
            self.downsample = nn.Sequential(*layers)

    def forward(self, x):
        skip = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + skip)


class TinyResNet(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.layer1 = nn.Sequential(Basic(8, 8, 1, **kw))
        self.layer2 = nn.Sequential(Basic(8, 8, 2, **kw), Basic(8, 8, **kw))
        self.layer3 = nn.Sequential(Basic(8, 16, 2, **kw), Basic(16, 16, **kw))
        self.layer4 = nn.Sequential(Basic(16, 16, 2, **kw))

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


@pytest.mark.parametrize("kw", [{}, {"bottleneck": True}, {"avg_down": True}])
def test_hand_made_resnet(kw):
    torch.manual_seed(0)
    model = TinyResNet(**kw)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 16, 2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = model.layer3[0]
    strided = first.conv2 if kw.get("bottleneck") else first.conv1
    h = model.layer2(model.layer1(model.stem(x)))
    low = strided(h if strided is first.conv1 else torch.relu(first.conv1(h)))

    out = make_high_resolution(model, stages=(3, "layer4"))
    assert out is model
    assert model(x).shape == (2, 16, 8, 8)  # 4x the side: two strides of 2 removed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # weights untouched
    assert strided.stride == (1, 1)
    strides = {n: m.stride for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(s == (1, 1) for n, s in strides.items() if n.startswith(("layer3", "layer4")))
    assert any(s == (2, 2) for n, s in strides.items() if n.startswith("layer2"))
    # the stride-1 convolution computes the stride-2 one at every other position
    high = strided(h if strided is first.conv1 else torch.relu(first.conv1(h)))
    torch.testing.assert_close(high[..., ::2, ::2], low)
    if kw.get("avg_down"):
        assert isinstance(model.layer3[0].downsample[0], nn.Identity)


def test_copy_and_errors():
    model = TinyResNet()
    x = torch.randn(1, 3, 32, 32)
    student = make_high_resolution(model, stages=("layer4",), copy=True)
    assert model(x).shape[-1] == 2 and student(x).shape[-1] == 4
    with pytest.raises(ValueError, match="no stage"):
        make_high_resolution(model, stages=("layer9",))
    with pytest.raises(ValueError, match="no strided"):
        make_high_resolution(model, stages=("layer1",))


def test_torchvision_resnet():
    tv = pytest.importorskip(
        "torchvision", reason="torchvision is not installed (optional; needs a matching torch build)"
    )
    model = tv.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    body = nn.Sequential(*list(model.children())[:-2])
    assert body(x).shape[-2:] == (2, 2)
    make_high_resolution(model, stages=("layer3", "layer4"))
    assert body(x).shape[-2:] == (8, 8)
    assert model.layer4[0].conv1.stride == (1, 1) and model.layer4[0].downsample[0].stride == (1, 1)
    bottleneck = make_high_resolution(tv.models.resnet50(weights=None), stages=(4,))
    assert bottleneck.layer4[0].conv2.stride == (1, 1) and bottleneck.layer4[0].downsample[0].stride == (1, 1)


@pytest.mark.parametrize("stages", ["layer4", 4, np.int64(4), torch.tensor(4), ["layer4"], (np.int32(4),)])
def test_one_stage_or_numpy_and_tensor_stage_numbers(stages):
    """A single stage name is one stage (not its letters); numpy / 0-d tensor ints are stage numbers."""
    x = torch.randn(1, 3, 32, 32)
    student = make_high_resolution(TinyResNet(), stages=stages, copy=True)
    assert student(x).shape[-1] == 4
    assert student.layer4[0].conv1.stride == (1, 1) and student.layer3[0].conv1.stride == (2, 2)


@pytest.mark.parametrize(
    "stages, error, message",
    [
        ([4.0], TypeError, r"stage number like 4; got float 4.0"),
        (4.0, TypeError, r"stages must be a stage name or number, or an iterable of them; got float"),
        ([True], TypeError, r"stage number like 4; got bool"),
        ((), ValueError, r"stages is empty"),
        (None, TypeError, r"stages must be a stage name or number, or an iterable of them; got NoneType"),
    ],
)
def test_bad_stages_are_named(stages, error, message):
    with pytest.raises(error, match=message):
        make_high_resolution(TinyResNet(), stages=stages)
    with pytest.raises(TypeError, match="resnet must be a torch.nn.Module"):
        make_high_resolution("resnet18")
