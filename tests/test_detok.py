"""The detokenizer: token geometry against a looped reference, the token mask, and that it learns."""
import torch

import torch.nn.functional as F

from detok import Detokenizer, DetokConfig, cluster_geometry, detok_loss, lookup_weights, pixel_coords


def test_cluster_geometry_matches_a_looped_reference():
    g, K = 6, 5
    labels = torch.randint(0, 4, (3, g * g), generator=torch.Generator().manual_seed(0))  # slot 4 stays empty
    centre, spread = cluster_geometry(labels, g, K)
    for b in range(3):
        for k in range(K):
            pts = [((j % g + 0.5) / g * 2 - 1, (j // g + 0.5) / g * 2 - 1) for j in range(g * g) if labels[b, j] == k]
            if not pts:
                assert centre[b, k].tolist() == [0, 0] and torch.allclose(spread[b, k], torch.full((2,), 1 / g))
                continue
            p = torch.tensor(pts)
            assert torch.allclose(centre[b, k], p.mean(0), atol=1e-5)
            assert torch.allclose(spread[b, k], p.std(0, unbiased=False).clamp_min(1 / g), atol=1e-5)
    # the pixel grid: centres of a 4x4 grid, row-major, (x, y)
    xy = pixel_coords(4)
    assert xy.shape == (16, 2) and torch.allclose(xy[1], torch.tensor([-0.25, -0.75]))


def test_padded_tokens_do_not_change_the_image():
    torch.manual_seed(0)
    d = Detokenizer(DetokConfig(image_size=16, token_dim=8, sprite_size=8, dim=16))
    tokens, mask = torch.randn(2, 4, 8), torch.tensor([[True, True, False, False], [True, True, True, False]])
    out = d(tokens, mask)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    tokens2 = tokens.clone()
    tokens2[~mask] = 100 * torch.randn(int((~mask).sum()), 8)      # garbage in the padded slots
    assert torch.equal(d(tokens2, mask), out)
    tokens2[0, 1] += 1                                              # a real token does matter
    assert not torch.allclose(d(tokens2, mask)[0], out[0])


def test_detokenizer_learns_to_paint_two_tokens():
    """Two tokens (left half red, right half blue, geometry learned too) -> a few Adam steps lower the loss a lot."""
    torch.manual_seed(0)
    d = Detokenizer(DetokConfig(image_size=16, token_dim=8, sprite_size=8, dim=32))
    target = torch.zeros(4, 3, 16, 16)
    target[:, 0, :, :8], target[:, 2, :, 8:] = 1, 1
    tokens, mask = torch.eye(8)[:2].expand(4, 2, 8), torch.ones(4, 2, dtype=torch.bool)
    labels = (torch.arange(16) % 4 >= 2).long().expand(4, 16)      # left / right half of a 4x4 patch grid
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = detok_loss(d(tokens, mask), target)[1] + d.geometry_loss(tokens, mask, labels, 4)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_a_sprite_moves_with_its_token():
    """A token draws its sprite in its own frame: moving its predicted centre by 3 pixels moves the
    picture by exactly 3 pixels (away from the border, where the sprite's edge repeats)."""
    torch.manual_seed(0)
    d = Detokenizer(DetokConfig(image_size=32, token_dim=8, sprite_size=8, dim=16))
    tokens, mask = torch.randn(1, 1, 8), torch.ones(1, 1, dtype=torch.bool)
    with torch.no_grad():
        d.geo.weight.zero_()
        d.geo.bias.copy_(torch.tensor([0.0, 0.0, -1.5, -1.5]))   # centre (0, 0), spread e^-1.5: the sprite spans +-11 px
        a = d(tokens, mask)
        d.geo.bias[0] = torch.atanh(torch.tensor(3 * 2 / 32))     # 3 pixels to the right, in [-1, 1] units
        b = d(tokens, mask)
    assert not torch.allclose(a, b)
    assert torch.allclose(b[..., 8:24, 11:27], a[..., 8:24, 8:24], atol=1e-5)


def test_separable_lookup_is_grid_sample():
    """The detokenizer's lookup (row weights @ sprite @ column weights^T) is F.grid_sample's bilinear
    lookup with border padding, values and gradients, for frames inside, across and outside the sprite."""
    g = torch.Generator().manual_seed(0)
    n, S, H = 6, 8, 20
    sprites = torch.randn(n, 4, S, S, generator=g, dtype=torch.float64, requires_grad=True)
    u = (torch.rand(n, H, generator=g, dtype=torch.float64) * 3.4 - 1.7).requires_grad_()   # per column
    v = (torch.rand(n, H, generator=g, dtype=torch.float64) * 3.4 - 1.7).requires_grad_()   # per row
    ours = lookup_weights(v, S)[:, None] @ sprites @ lookup_weights(u, S)[:, None].transpose(-1, -2)  # (n, 4, H, W)
    grid = torch.stack([u[:, None, :].expand(-1, H, -1), v[:, :, None].expand(-1, -1, H)], -1)      # (n, H, W, 2)
    ref = F.grid_sample(sprites, grid, mode='bilinear', padding_mode='border', align_corners=False)
    assert torch.allclose(ours, ref, atol=1e-12)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((ours * w).sum(), (sprites, u, v))
    gb = torch.autograd.grad((ref * w).sum(), (sprites, u, v))
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-9)


def test_detokenizer_runs_in_float32_under_autocast():
    """bf16 autocast (dtype=bfloat16) leaves the picture as float32 gives it."""
    torch.manual_seed(0)
    d = Detokenizer(DetokConfig(image_size=16, token_dim=8, sprite_size=8, dim=16))
    tokens, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        a = d(tokens, mask)
    assert a.dtype == torch.float32 and torch.equal(a, d(tokens, mask))
