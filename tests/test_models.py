"""Model core: shapes, gradients, fast path = reference path, masking, checkpointing, weights."""

from __future__ import annotations

import pytest
import torch

from models import count_parameters, create_model, load_mae_weights
from models.attention import Attention
from models.hip import regroup
from models.inputs import assign_groups, group_tokens, ungroup_tokens
from models.mae import groupwise_mask, random_mask
from models.position import fourier_features
from models.registry import HIP_PRESETS

TINY = ["hip_tiny", "hip_tiny5", "perceiver_io_tiny", "perceiver_tiny"]
MIXES = {
    "image": {"image": (64, 3)},
    "audio": {"audio": (128, 1)},
    "video+audio": {"video": (128, 3), "audio": (256, 1)},
}
GRIDS = {"video": (2, 8, 8)}


def _build(name, inputs, task, **kw):
    if name.startswith("perceiver") and task == "classify":
        kw.setdefault("grids", {k: v for k, v in GRIDS.items() if k in inputs})
    return create_model(name, inputs=inputs, task=task, num_classes=7, **kw)


def _batch(inputs, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, m, c, generator=g) for k, (m, c) in inputs.items()}


CASES = [(n, mix, t) for n in TINY for mix in MIXES for t in ("mae", "classify")
         if not (n == "perceiver_tiny" and t == "mae")]  # the Perceiver has no MAE decoder


@pytest.mark.parametrize("name,mix,task", CASES)
def test_shapes_finite_and_every_parameter_gets_a_gradient(name, mix, task):
    torch.manual_seed(0)
    inputs = MIXES[mix]
    model = _build(name, inputs, task)
    x = _batch(inputs)
    if task == "mae":
        loss, pred, mask = model(x)
        assert loss.ndim == 0 and torch.isfinite(loss)
        for k, (m, c) in inputs.items():
            assert pred[k].shape == (2, m, c) and torch.isfinite(pred[k]).all()
            assert mask[k].shape == (2, m) and set(mask[k].unique().tolist()) <= {0.0, 1.0}
        objective = loss
    else:
        logits = model(x)
        assert logits.shape == (2, 7) and torch.isfinite(logits).all()
        objective = logits.square().mean()
    objective.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


def test_mae_prediction_starts_at_zero_from_zero_initialised_unembed():
    model = create_model("hip_tiny", inputs=MIXES["image"], task="mae")
    _, pred, _ = model(_batch(MIXES["image"]))
    assert torch.count_nonzero(pred["image"]) == 0


def test_hidden_tokens_are_dropped_from_the_encoder_input():
    model = create_model("hip_tiny", inputs={"image": (64, 3)}, task="mae", mask_ratio=0.75)
    seen = {}

    def hook(module, args, out):
        seen["kv"] = args[1].shape

    model.backbone.levels[0].cross.register_forward_hook(hook)
    model(_batch({"image": (64, 3)}))
    # 4 groups of 16 positions, 75% hidden -> 4 visible tokens per group reach the encoder.
    assert tuple(seen["kv"]) == (2, 4, 4, 16)


def test_sdpa_equals_reference_attention():
    torch.manual_seed(0)
    attn = Attention(q_dim=24, kv_dim=40, num_heads=4, qk_channels=32, out_dim=24)
    q, kv = torch.randn(3, 5, 7, 24), torch.randn(3, 5, 11, 40)
    fast = attn(q, kv)
    attn.use_sdpa = False
    ref = attn(q, kv)
    assert fast.shape == (3, 5, 7, 24)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["hip_tiny5", "perceiver_io_tiny"])
def test_whole_model_fast_path_equals_reference_path(name):
    torch.manual_seed(0)
    model = create_model(name, inputs=MIXES["image"], task="classify", num_classes=3).eval()
    x = _batch(MIXES["image"])
    fast = model(x)
    for m in model.modules():
        if isinstance(m, Attention):
            m.use_sdpa = False
    torch.testing.assert_close(fast, model(x), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    model = create_model("hip_tiny", inputs=MIXES["image"], task="classify", num_classes=3).eval()
    x = _batch(MIXES["image"])
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, rtol=0.1, atol=0.1)


def test_groupwise_mask_hides_the_same_positions_in_every_group_and_is_seeded():
    ids, mask = groupwise_mask(3, 64, 4, 0.75, generator=torch.Generator().manual_seed(1))
    per_group = mask.view(3, 4, 16)
    assert (per_group.sum(-1) == 12).all()  # same hidden count in every group
    assert (per_group == per_group[:, :1]).all()  # same relative positions in every group
    assert ids.shape == (3, 16) and (ids.diff(dim=1) > 0).all()  # sorted: raster order kept
    again, _ = groupwise_mask(3, 64, 4, 0.75, generator=torch.Generator().manual_seed(1))
    other, _ = groupwise_mask(3, 64, 4, 0.75, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    assert not torch.equal(per_group[0], per_group[1])  # examples differ


def test_groupwise_mask_on_a_length_that_does_not_divide_stays_rectangular():
    ids, mask = groupwise_mask(4, 10, 3, 0.5, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (4, 3 * 2) and mask.shape == (4, 10)  # ceil(10/3)=4 per group, keep 2
    model = create_model("hip_tiny", inputs={"image": (30, 3)}, task="mae", mask_ratio=0.5)
    loss, pred, m = model(_batch({"image": (30, 3)}))  # 30 positions in 4 groups of 8
    assert torch.isfinite(loss) and pred["image"].shape == (2, 30, 3) and m["image"].shape == (
        2, 30)


def test_random_mask_counts():
    ids, mask = random_mask(2, 100, 0.85, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 15) and (mask.sum(1) == 85).all()
    assert torch.equal(mask.gather(1, ids), torch.zeros(2, 15))


def test_activation_checkpointing_gives_equal_outputs_and_grads():
    inputs = MIXES["image"]
    torch.manual_seed(0)
    plain = create_model("hip_tiny5", inputs=inputs, task="mae", mask_ratio=0.5)
    torch.manual_seed(0)
    ckpt = create_model("hip_tiny5", inputs=inputs, task="mae", mask_ratio=0.5,
                        checkpoint_levels=True)
    ckpt.load_state_dict(plain.state_dict())
    x = _batch(inputs)
    la, pa, _ = plain(x, generator=torch.Generator().manual_seed(5))
    lb, pb, _ = ckpt(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(pa["image"], pb["image"])
    la.backward()
    lb.backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_classifier_loads_mae_weights_with_no_missing_encoder_keys():
    inputs = MIXES["video+audio"]
    mae = create_model("hip_tiny5", inputs=inputs, task="mae")
    clf = create_model("hip_tiny5", inputs=inputs, task="classify", num_classes=4)
    report = load_mae_weights(clf, mae.state_dict())
    assert report.missing and all(k.startswith("head.") for k in report.missing)
    assert any(k.startswith("backbone.recon") for k in report.unexpected)
    assert any(k.startswith("backbone.levels.4") for k in report.unexpected)
    own = clf.state_dict()
    for k in report.loaded:
        assert torch.equal(own[k], mae.state_dict()[k])
    wrong = create_model("hip_tiny", inputs=inputs, task="classify", num_classes=4)
    with pytest.raises(ValueError, match="do not fit"):
        load_mae_weights(wrong, mae.state_dict())


def test_processor_latent_subsampling_at_train_time_only():
    model = create_model("hip_tiny", inputs=MIXES["image"], task="classify", num_classes=2,
                         processor_latents_train=2)
    seen = []

    def hook(module, args, out):
        seen.append(out.shape)

    model.backbone.levels[1].register_forward_hook(hook)
    x = _batch(MIXES["image"])
    model.train()(x)
    model.eval()(x)
    assert seen[0][2] == 2 and seen[1][2] == 4


def test_bad_inputs_raise_value_errors_naming_the_values():
    model = create_model("hip_tiny", inputs=MIXES["image"], task="mae")
    with pytest.raises(ValueError, match=r"expects modalities \['image'\], got \['audio'\]"):
        model({"audio": torch.randn(2, 64, 3)})
    with pytest.raises(ValueError, match=r"\(B, 64, 3\), got \(2, 60, 3\)"):
        model({"image": torch.randn(2, 60, 3)})
    with pytest.raises(ValueError, match="length 3 is shorter than its group count 4"):
        create_model("hip_tiny", inputs={"image": (3, 3)}, task="mae")
    for ratio in (1.0, -0.1):
        with pytest.raises(ValueError, match=f"mask ratio must be in \\[0, 1\\), got {ratio}"):
            create_model("hip_tiny", inputs=MIXES["image"], task="mae", mask_ratio=ratio)
    with pytest.raises(ValueError, match="heads do not divide"):
        create_model("hip_tiny", inputs=MIXES["image"], task="mae", width_mult=1.1)
    with pytest.raises(ValueError, match="Perceiver preset has no MAE decoder"):
        create_model("perceiver_tiny", inputs=MIXES["image"], task="mae")
    with pytest.raises(ValueError, match="unknown model 'hip9'"):
        create_model("hip9", inputs=MIXES["image"])


def test_grouping_round_trip_and_proportional_allotment():
    assert assign_groups(16, [8 * 224 * 224, 122880]) == [12, 4]  # minimises the largest group
    assert assign_groups(4, [10, 10]) == [2, 2]
    a, b = torch.randn(2, 10, 5), torch.randn(2, 7, 5)
    grouped = group_tokens([a, b], [3, 2])
    assert grouped.shape == (2, 5, 4, 5)  # ceil(10/3)=4, ceil(7/2)=4
    ra, rb = ungroup_tokens(grouped, [10, 7], [3, 2])
    assert torch.equal(ra, a) and torch.equal(rb, b)


def test_regroup_merges_neighbouring_groups():
    x = torch.arange(2 * 4 * 3).view(1, 4, 3, 2)  # (B, G', N', C)
    y = regroup(x, 2)
    assert y.shape == (1, 2, 6, 2)
    assert torch.equal(y[0, 0], torch.cat([x[0, 0], x[0, 1]]))


def test_truncated_normal_init_has_the_haiku_statistics():
    from models.attention import variance_scaling_

    w = variance_scaling_(torch.empty(1000, 1000), fan_in=1000)
    # VarianceScaling(1.0, fan_in): variance 1/fan_in after truncation at 2 std.
    assert w.var().item() == pytest.approx(1e-3, rel=0.02)
    assert w.abs().max().item() <= 2 * (1e-3) ** 0.5 / 0.87962566103423978 + 1e-6


def test_a_meta_device_build_skips_initialisation_and_never_imports_dynamo():
    # preflight builds every job's model on meta; torch's _refs for erfinv_/clamp_ on meta
    # import torch._dynamo, ~1.2 s of CPU per job (and per sweep trial). Fresh interpreter:
    # this session may have imported it already.
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from models import create_model\n"
            "with torch.device('meta'):\n"
            "    m = create_model('hip16', inputs={'image': (224 * 224, 3)}, task='mae')\n"
            "assert next(m.parameters()).is_meta\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_fourier_features_match_the_perceiver_layout():
    ff = fourier_features((224, 224), num_bands=64)
    assert ff.shape == (224 * 224, 258)
    # First two channels are the (row, col) positions in [-1, 1]; then sines, then cosines.
    assert torch.allclose(ff[0, :2], torch.tensor([-1.0, -1.0]))
    assert torch.allclose(ff[-1, :2], torch.tensor([1.0, 1.0]))
    assert torch.allclose(ff[0, 2], torch.sin(torch.tensor(-torch.pi)), atol=1e-5)
    assert torch.allclose(ff[0, 2 + 128], torch.cos(torch.tensor(-torch.pi)), atol=1e-5)


# --- parameter counts: an independent count written from the official code's conventions ---

def _lin(i, o):
    return i * o + o


def _attn(q, kv, qk, v, out):
    return _lin(q, qk) + _lin(kv, qk) + _lin(kv, v) + _lin(v, out)


def _cross(d, c, widening=1):  # queries D, inputs C; Q/K/V width C; LNs on q, kv and mlp
    return 2 * d + 2 * c + _attn(d, c, c, c, d) + 2 * d + _lin(d, widening * d) + _lin(
        widening * d, d)


def _self(d):
    return 4 * d + _attn(d, d, d, d, d) + _lin(d, 4 * d) + _lin(4 * d, d)


def _official_hip_count(arch, m, c, decoder, num_classes=None):
    e, n = arch.embed_dim, len(arch.groups)
    mid = n // 2
    total = _lin(c, e) + m * e
    built = n if decoder else mid + 1
    for i in range(built):
        d = arch.channels[i]
        cin = e if i == 0 else arch.channels[i - 1]
        total += arch.groups[i] * arch.latents[i] * d + _cross(d, cin)
        total += arch.layers[i] * _self(d)
        if i > mid and arch.channels[n - 1 - i] != d:
            total += _lin(arch.channels[n - 1 - i], d)
    if decoder:
        dl = arch.channels[-1]
        total += 2 * e + 2 * dl + _attn(e, dl, dl, dl, e) + 2 * e + 2 * _lin(e, e) + _lin(e, c)
    else:  # learned-query head: query (1, D) + cross-attention + Linear (no LN, as official)
        d = arch.channels[mid]
        total += d + _cross(d, d) + _lin(d, num_classes)
    return total


@pytest.mark.parametrize("name", ["hip16", "hip256", "hip_mini", "hip_tiny5"])
def test_hip_parameter_count_matches_the_official_conventions(name):
    arch = HIP_PRESETS[name]()
    inputs = {"image": (224 * 224, 3)}
    mae = create_model(name, inputs=inputs, task="mae")
    clf = create_model(name, inputs=inputs, task="classify", num_classes=1000)
    assert count_parameters(mae) == _official_hip_count(arch, 224 * 224, 3, decoder=True)
    assert count_parameters(clf) == _official_hip_count(arch, 224 * 224, 3, decoder=False,
                                                        num_classes=1000)


@pytest.mark.parametrize("name,paper", [("perceiver", 44.9e6), ("perceiver_io", 48.4e6)])
def test_perceiver_parameter_counts_match_the_papers(name, paper):
    model = create_model(name, inputs={"image": (224 * 224, 3)}, task="classify",
                         num_classes=1000)
    assert abs(count_parameters(model) - paper) < 0.05e6


@pytest.mark.parametrize("name", ["hip16", "hip256", "hip_mini"])
def test_full_size_hip_runs_on_a_small_image(name):
    torch.manual_seed(0)
    inputs = {"image": (64 * 64, 3)}
    model = create_model(name, inputs=inputs, task="mae")
    with torch.no_grad():
        loss, pred, mask = model(_batch(inputs, b=1))
    assert torch.isfinite(loss) and pred["image"].shape == (1, 4096, 3)
    # 16 groups (hip16) or 256 (hip256) of 4096 positions: keep = n - round(0.85 n) per group.
    per_group = 4096 // HIP_PRESETS[name]().groups[0]
    hidden = round(0.85 * per_group) / per_group
    assert mask["image"].mean().item() == pytest.approx(hidden)
