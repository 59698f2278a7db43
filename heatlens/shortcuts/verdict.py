"""From per-image measures to a verdict: each class's numbers with bootstrap intervals, the
rules that flag a class, an image or a cluster, and the reason in words.

A class is flagged when any of these holds (each threshold is a constant below):

1. **border**: the lower end of the 95 % interval of its mean border-band share exceeds
   :data:`BORDER` (the band holds 36 % of the pixels; a map spread evenly gives it 36 %);
2. **place**: in at least :data:`MOST` of its images the same place (a corner or edge strip of
   the band) holds at least :data:`PLACE` times the relevance its area would get from an even
   map (a corner square holds 4 % of the pixels): a watermark, a token, a ruler;
3. **off the object** (boxes or masks): the upper end of the interval of its mean lift is below
   1: the object gets no more relevance than its area would give it by chance;
4. **object not needed** (boxes or masks): with the object removed, the backgrounds of its own
   images give the class a probability at least :data:`KEPT` higher than the backgrounds of
   any other class's images do (the highest of their means): its own backgrounds carry
   evidence for it (a class the model picks for any empty background, its default, is not
   flagged for that).

The background gap (masks) is reported beside them, not used to flag: on the synthetic check of
``tests/test_audit.py`` models trained without any shortcut still showed gaps up to 0.5 on 20
images a class, one pasting each, too noisy to accuse a class by.

Classes are ranked worst first by the share of their relevance off the object (with objects:
``1 - relevance mass``; without: the border share), with its interval.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from heatlens.metrics.report import bootstrap_interval
from heatlens.shortcuts.measures import BAND, PLACES

BORDER = 0.5
PLACE = 4.0
MOST = 0.5
KEPT = 0.4
AREAS = dict(zip(PLACES, [(2 * BAND) ** 2] * 4 + [BAND * (1 - 4 * BAND)] * 4, strict=True))
"""The share of the pixels each place holds, with the default band."""


def _values(rows: list[dict[str, Any]], key: str) -> torch.Tensor:
    return torch.tensor([float("nan") if row.get(key) is None else float(row[key])
                         for row in rows], dtype=torch.float64)


def class_row(name: str, index: int, rows: list[dict[str, Any]], seed: int,
              elsewhere: float | None = None) -> dict[str, Any]:
    """One class's numbers, flags and reasons from its images' rows; ``elsewhere`` is the
    class's highest mean probability on another class's images with their objects removed."""
    band = bootstrap_interval(_values(rows, "band"), seed=seed)
    places = Counter(row["place"] for row in rows if over(row))
    place, count = places.most_common(1)[0] if places else (None, 0)
    at_place = [row["place_share"] for row in rows if row["place"] == place and over(row)]
    row = {"class": index, "class_name": name, "images": len(rows),
           "band": band.mean, "band_low": band.low, "band_high": band.high,
           "place": place, "place_images": count,
           "place_share": sum(at_place) / len(at_place) if at_place else None,
           "probability": float(_values(rows, "probability").nanmean())}
    reasons = []
    label = f"class {name!r}"
    if band.low > BORDER:
        reasons.append(f"{band.mean:.0%} of the relevance for {label} lies in the border band "
                       f"(which holds 36% of the pixels)")
    if place is not None and count >= MOST * len(rows):
        reasons.append(f"{row['place_share']:.0%} of the relevance for {label} lies in the "
                       f"{place} (which holds {AREAS[place]:.0%} of the pixels) in {count} of "
                       f"{len(rows)} images")
    has_objects = any(r.get("mass") is not None for r in rows)
    off = band
    if has_objects:
        mass = bootstrap_interval(_values(rows, "mass"), seed=seed)
        lift = bootstrap_interval(_values(rows, "lift"), seed=seed)
        off = bootstrap_interval(1 - _values(rows, "mass"), seed=seed)
        without = float(_values(rows, "p_without_object").nanmean())
        kept = without - (elsewhere or 0.0)
        row |= {"mass": mass.mean, "mass_low": mass.low, "mass_high": mass.high,
                "lift": lift.mean, "lift_low": lift.low, "lift_high": lift.high,
                "hit_rate": float(_values(rows, "hit").nanmean()),
                "rank": float(_values(rows, "rank").nanmean()),
                "p_without_object": without, "p_without_object_elsewhere": elsewhere,
                "kept": kept,
                "p_object_only": float(_values(rows, "p_object_only").nanmean())}
        if lift.high < 1:
            reasons.append(f"the object holds {mass.mean:.0%} of the relevance for {label}, "
                           f"no more than its area (lift {lift.mean:.2f})")
        if kept >= KEPT:
            reasons.append(f"removing the object keeps p({name}) at {without:.2f} (from "
                           f"{row['probability']:.2f}), against {elsewhere or 0.0:.2f} on the "
                           "other classes' backgrounds")
    same, other = _values(rows, "correct_same"), _values(rows, "correct_other")
    if not torch.isnan(same).all() and not torch.isnan(other).all():
        gap = float(same.nanmean() - other.nanmean())
        row["background_gap"] = gap
    row |= {"off_object": off.mean, "off_object_low": off.low, "off_object_high": off.high,
            "flagged": bool(reasons), "reasons": reasons}
    return row


def over(row: dict[str, Any]) -> bool:
    """Whether an image's place holds :data:`PLACE` times its area's share or more."""
    return row["place_share"] >= PLACE * AREAS[row["place"]]


def image_reason(row: dict[str, Any]) -> str | None:
    """Why an image's own map is off the object (or in one place), or ``None``."""
    if over(row):
        return f"{row['place_share']:.0%} of its relevance lies in the {row['place']}"
    if row["band"] > BORDER:
        return f"{row['band']:.0%} of its relevance lies in the border band"
    if row.get("lift") is not None and row["lift"] < 1:
        return f"the object holds {row['mass']:.0%} of its relevance (lift {row['lift']:.2f})"
    return None


def place_name(index: int) -> str:
    """The name of a place of :data:`heatlens.shortcuts.measures.PLACES`."""
    return PLACES[index]
