"""trainers.conv_matmul: a convolution as one matrix product, against torch's own."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from trainers.conv_matmul import MatmulConv2d, conv2d_as_matmul, convertible, with_matmul_convs
from trainers.models.convnets import SimpleCNN


@pytest.mark.parametrize("im2col", ["slices", "unfold"])
@pytest.mark.parametrize("stride, padding, dilation", [
    ((1, 1), (2, 2), (1, 1)), ((2, 1), (0, 1), (1, 2)), ((3, 2), (1, 0), (2, 1))])
def test_equals_conv2d(stride, padding, dilation, im2col):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 11, 9, dtype=torch.float64)
    w = torch.randn(5, 4, 3, 5, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    want = F.conv2d(x, w, b, stride, padding, dilation)
    got = conv2d_as_matmul(x, w, b, stride, padding, dilation, im2col)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # Channels-last input (what the previous MatmulConv2d hands the next): same numbers.
    got_cl = conv2d_as_matmul(x.contiguous(memory_format=torch.channels_last), w, None, stride, padding,
                              dilation, im2col)
    torch.testing.assert_close(got_cl, want - b.view(1, -1, 1, 1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("im2col", ["slices", "unfold"])
def test_gradients_under_vmap_equal_the_grouped_convolution(im2col):
    """vmap over K trials (input and weight both stacked) makes F.conv2d a grouped
    convolution; the matmul form must give the same gradients for weights and inputs."""
    torch.manual_seed(1)
    xs = torch.randn(6, 3, 4, 11, 9, dtype=torch.float64)
    ws = torch.randn(6, 5, 4, 5, 5, dtype=torch.float64)
    grouped = lambda w, x: F.conv2d(x, w, None, 1, 2).square().sum()
    matmul = lambda w, x: conv2d_as_matmul(x, w, None, (1, 1), (2, 2), im2col=im2col).square().sum()
    for argnum in (0, 1):
        want = vmap(grad(grouped, argnums=argnum))(ws, xs)
        got = vmap(grad(matmul, argnums=argnum))(ws, xs)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)


def test_with_matmul_convs_swaps_a_copy_and_keeps_names():
    torch.manual_seed(2)
    model = SimpleCNN().double()
    swapped = with_matmul_convs(model, im2col="unfold")
    assert [type(m) for m in model.modules() if isinstance(m, nn.Conv2d)] == [nn.Conv2d] * 2
    assert [(type(m), m.im2col) for m in swapped.modules() if isinstance(m, nn.Conv2d)] == \
        [(MatmulConv2d, "unfold")] * 2
    assert dict(swapped.named_parameters()).keys() == dict(model.named_parameters()).keys()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    state = dict(model.named_parameters())
    torch.testing.assert_close(functional_call(swapped, state, (x,)), model(x), rtol=1e-10, atol=1e-10)
    assert all(p is not q for p, q in zip(model.parameters(), swapped.parameters()))


def test_an_unknown_gather_is_an_error():
    with pytest.raises(ValueError, match="im2col"):
        conv2d_as_matmul(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), None, im2col="fft")


def test_only_plain_zero_padded_convolutions_convert():
    assert convertible(nn.Conv2d(2, 3, 3, padding=1))
    assert not convertible(nn.Conv2d(4, 4, 3, groups=2))
    assert not convertible(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"))
    assert not convertible(nn.Conv2d(2, 3, 3, padding="same"))
    assert not convertible(nn.Conv1d(2, 3, 3))
