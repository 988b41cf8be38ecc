"""Anytime SRT on the synthetic backbone, small: the anytime order is closer to the full 50-view result
than the paper's raster order after every k = 2..49 views (k = 1 is the identity in both), and
SRT(max_views=k) is the mean of the order's first k views (checked inside distance_curves). The
committed results come from bench/anytime.py (its command is in bench/results/anytime-cpu.md)."""
from bench.anytime import SyntheticBackbone, distance_curves, oriented_scenes, summarise


def test_anytime_order_beats_raster_at_every_k_on_the_synthetic_backbone():
    table = summarise(distance_curves(SyntheticBackbone(), oriented_scenes(56), seeds=1))
    raster = table["raster"]["curve"]
    assert table["anytime"]["beats_raster_at"] == list(range(2, len(raster))), \
        [(k, table["anytime"]["curve"][k - 1], raster[k - 1]) for k in range(2, len(raster))]
