"""The detokenizer: token geometry against a looped reference, the token mask, and that it learns."""
import torch

from detok import Detokenizer, DetokConfig, cluster_geometry, detok_loss, pixel_coords


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
