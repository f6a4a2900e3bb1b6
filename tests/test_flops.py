"""The analytic FLOPs model (pretrain/flops.py)."""

import pytest

from pretrain.flops import flops_ratio, layer_forward_flops, train_step_breakdown, train_step_flops
from pretrain.model import ModelConfig


def tiny() -> ModelConfig:
    return ModelConfig.from_preset("tiny", vocab_size=100)  # L=4, H=64, I=256


def test_hand_checked_tiny_case():
    # S=8, keep 0.5 -> K=4; mask_fraction 0.25 -> n=2 predicted positions; batch 1.
    # Per layer (q queries, s keys): 2qH^2 + 4sH^2 + 2qH^2 + 4qsH + 4qHI with H^2=4096, HI=16384.
    full = 65536 + 131072 + 65536 + 16384 + 524288  # q = s = 8 (layer 0)      = 802,816
    boundary = 32768 + 131072 + 32768 + 8192 + 262144  # q = 4, s = 8 (layer 1) = 466,944
    kept = 32768 + 65536 + 32768 + 4096 + 262144  # q = s = 4 (layer 2)        = 397,312
    output = 16384 + 131072 + 16384 + 4096 + 131072  # q = 2, s = 8 (layer 3)   = 299,008
    head = 2 * (2 * 4096 + 2 * 64 * 100)  # n (2H^2 + 2HV)                     = 41,984
    assert layer_forward_flops(tiny(), 8, 8) == full
    assert layer_forward_flops(tiny(), 4, 8) == boundary

    dropped = train_step_flops(tiny(), 1, 8, keep_ratio=0.5, mask_fraction=0.25)
    assert dropped == 3 * (full + boundary + kept + output + head)
    dense = train_step_flops(tiny(), 1, 8, keep_ratio=1.0, mask_fraction=0.25)
    assert dense == 3 * (3 * full + output + head)
    assert flops_ratio(tiny(), 8, 0.5, mask_fraction=0.25) == pytest.approx(
        (full + boundary + kept + output + head) / (3 * full + output + head)
    )
    # Linear in the batch size.
    assert train_step_flops(tiny(), 5, 8, 0.5, 0.25) == pytest.approx(5 * dropped)


def test_keep_ratio_one_is_dense_and_savings_grow_as_fewer_tokens_are_kept():
    cfg = ModelConfig.from_preset("mid", vocab_size=8192)
    dense = train_step_flops(cfg, 8, 512)
    assert train_step_flops(cfg, 8, 512, keep_ratio=1.0) == dense
    ratios = [flops_ratio(cfg, 512, keep) for keep in (1.0, 0.9, 0.75, 0.5, 0.25, 0.1)]
    assert ratios[0] == 1.0
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    # The paper's setting saves about a quarter: half the tokens in ~5/12 of the layers.
    assert 0.65 < flops_ratio(cfg, 512, 0.5) < 0.8


def test_breakdown_follows_the_layer_split():
    cfg = ModelConfig.from_preset("mid")
    stages = train_step_breakdown(cfg, 2, 128, keep_ratio=0.5)
    names = [s.name for s in stages]
    assert names == ["embeddings", *(f"layer.{i}" for i in range(12)), "mlm_head"]
    roles = [s.role for s in stages[1:-1]]
    assert roles == ["full"] * 5 + ["boundary"] + ["kept"] * 5 + ["output"]
    flops = {s.role: s.train_flops for s in stages}
    assert flops["full"] > flops["boundary"] > flops["kept"] > 0
    assert stages[0].train_flops == 0.0
    assert sum(s.train_flops for s in stages) == train_step_flops(cfg, 2, 128, keep_ratio=0.5)

    custom = ModelConfig.from_preset("mid", drop_start_layer=2, drop_end_layer=4)
    roles = [s.role for s in train_step_breakdown(custom, 1, 64, 0.5)[1:-1]]
    assert roles == ["full", "full", "boundary", "kept", "kept"] + ["full"] * 6 + ["output"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="keep_ratio"):
        train_step_flops(tiny(), 1, 8, keep_ratio=0.0)
    with pytest.raises(ValueError, match="mask_fraction"):
        train_step_flops(tiny(), 1, 8, mask_fraction=1.5)
