"""Plausibility of each site against the others, in plaintext mode, from what their layouts declare before any
tensor is sent: the largest magnitude of every weight, and every Gram's trace per token. One site that scales its
weights or Grams far beyond the others' would otherwise steer the merge unnoticed.

The reference is the *lower* median over sites, so that with two sites the smaller one is the reference (a plain
median of two would sit halfway to the outlier). A site above ``SCALE_FACTOR`` times the reference is rejected;
what it later sends must equal what it declared. Influence (each site's share of every summed Gram's trace, which
is its weight in the solve) is reported, and a site holding most of it is named in a warning; so is, once merged,
the merge's distance from each site's model (:mod:`fusion.distance`), and a site the merge lies close to while far
from every other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fusion.privacy import TAIL_SIGMAS

SCALE_FACTOR = 100.0  # how far above the other sites' weights or Gram traces per token a site may be
DOMINANT_SHARE = 0.9  # a site holding more of a summed Gram's trace than this is named in a warning
NEAR_FACTOR = 0.1  # a merge this much closer to one owner than to any other is named in a warning


def lower_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def outliers(declared: Mapping[int, Mapping[str, float]], what: str, factor: float = SCALE_FACTOR) -> dict[int, str]:
    """Sites whose declared value of some tensor is more than ``factor`` times the sites' lower median for it (or
    not a finite non-negative number): node id -> the reason, naming the tensor."""
    found: dict[int, str] = {}
    names = set().union(*(values.keys() for values in declared.values())) if declared else set()
    for name in sorted(names):
        values = {node: float(values[name]) for node, values in declared.items() if name in values}
        for node, value in values.items():
            if not math.isfinite(value) or value < 0:
                found.setdefault(node, f"{what} of {name!r} is not a finite non-negative number")
        reference = lower_median([v for v in values.values() if math.isfinite(v) and v >= 0] or [0.0])
        for node, value in values.items():
            if reference > 0 and value > factor * reference:
                found.setdefault(node, f"{what} of {name!r} is {value / reference:.3g} times the sites' median "
                                       f"(at most {factor:g} is accepted)")
    return found


def per_token_traces(layouts: Mapping[int, Mapping]) -> dict[int, dict[str, float]]:
    """Each site's Gram traces divided by its token counts: the mean squared input norm, alike across sites.

    Sites with differentially private statistics are left out: their rows have unit norm (the trace per example is
    at most the clip), and the noise, comparable to the trace itself for small sites, would make honest sites look
    implausible."""
    out = {}
    for node, layout in layouts.items():
        statistics = layout.get("statistics", {})
        if is_private(statistics):
            continue
        grams = statistics.get("grams", {})
        out[node] = {key: float(trace) / max(int(grams[key]["tokens"]), 1)
                     for key, trace in layout.get("traces", {}).items() if key in grams}
    return out


def is_private(statistics: Mapping) -> bool:
    """Whether a layout's statistics metadata is that of differentially private statistics."""
    return bool(statistics.get("privacy"))


def privacy_misfits(layouts: Mapping[int, Mapping]) -> dict[int, str]:
    """Where some sites' statistics are differentially private and others' are not (their Grams are on different
    scales: unit rows against raw ones), the minority, each with the reason; ties reject the private ones."""
    private = {node for node, layout in layouts.items() if is_private(layout.get("statistics", {}))}
    exact = set(layouts) - private
    if not private or not exact:
        return {}
    minority, kind = (private, "differentially private") if len(private) <= len(exact) else (exact, "exact")
    return {node: f"its statistics are {kind}, unlike those of most sites (Grams on different scales; every site "
                  "must release DP statistics, or none)" for node in minority}


def private_trace_misfits(layouts: Mapping[int, Mapping]) -> dict[int, str]:
    """Differentially private sites whose declared Gram traces no honest release can have, each with the reason.

    Clipping bounds a DP Gram's trace absolutely: unit-norm rows, each example weighing at most ``clip``, give a
    trace between 0 and ``clip * N``; the noise moves it by a Gaussian of deviation ``noise_std * sqrt(d)`` (the
    diagonal's ``d`` entries). Beyond ``TAIL_SIGMAS`` deviations of that interval the trace is not noise but
    scaling, which the per-token comparison (left out for DP sites) would otherwise have caught."""
    found: dict[int, str] = {}
    clips = [_declared(layout, "clip") for layout in layouts.values() if is_private(layout.get("statistics", {}))]
    known = [clip for clip in clips if clip is not None]
    agreed = lower_median(known) if known else None
    for node, layout in layouts.items():
        statistics = layout.get("statistics", {})
        if not is_private(statistics):
            continue
        try:
            release, grams = statistics["privacy"], statistics["grams"]
            # The bound below holds for the clip and noise the site declares: the clip must be the sites' own, and
            # the noise what the declared calibration gives (a large declared noise would excuse any trace).
            if float(release["clip"]) != agreed:
                found[node] = (f"its DP clip {release['clip']} differs from the other DP sites' {agreed} (one clip "
                               "for every site: the Grams must be on one scale)")
                continue
            expected = float(release["noise_multiplier"]) * float(release["clip"]) * math.sqrt(2.0 * len(grams))
            if not math.isclose(float(release["noise_std"]), expected, rel_tol=1e-6):
                found[node] = (f"its declared DP noise {release['noise_std']} is not what its noise multiplier and "
                               f"clip give over {len(grams)} Grams ({expected:.6g})")
                continue
            ceiling = float(release["clip"]) * int(statistics["example_count"])
            for key, trace in sorted(layout.get("traces", {}).items()):
                slack = TAIL_SIGMAS * float(release["noise_std"]) * math.sqrt(int(grams[key]["dim"]))
                if not -slack <= float(trace) <= ceiling + slack:
                    found[node] = (f"the trace of its DP Gram {key!r} is {float(trace):.4g}, outside the "
                                   f"[{-slack:.4g}, {ceiling + slack:.4g}] that clipping to {release['clip']} "
                                   f"over {statistics['example_count']} examples and its noise allow")
                    break
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            found[node] = f"its DP statistics metadata is malformed ({type(error).__name__}: {error})"
    return found


def _declared(layout: Mapping, field: str) -> float | None:
    """A DP site's declared release field as a number, or None where it has none."""
    try:
        return float(layout["statistics"]["privacy"][field])
    except (KeyError, TypeError, ValueError):
        return None


def influence(layouts: Mapping[int, Mapping]) -> dict[int, dict[str, float]]:
    """Each site's share of the examples and of every summed Gram's trace (its largest and its mean share)."""
    traces = {node: layout.get("traces", {}) for node, layout in layouts.items()}
    examples = {node: int(layout.get("statistics", {}).get("example_count", 0)) for node, layout in layouts.items()}
    keys = set().union(*(t.keys() for t in traces.values())) if traces else set()
    totals = {key: sum(float(t.get(key, 0.0)) for t in traces.values()) for key in keys}
    all_examples = sum(examples.values())
    report = {}
    for node in layouts:
        # max(0, ·): a differentially private trace may be negative
        shares = [max(float(traces[node].get(key, 0.0)), 0.0) / totals[key] for key in keys if totals[key] > 0]
        report[node] = {"examples_share": examples[node] / all_examples if all_examples else 0.0,
                        "largest_gram_share": max(shares, default=0.0),
                        "mean_gram_share": sum(shares) / len(shares) if shares else 0.0}
    return report


def near_one_owner(distances: Mapping[str, float], factor: float = NEAR_FACTOR) -> str | None:
    """The owner the merge lies close to while far from every other (distance below ``factor`` times the nearest
    other owner's), or None. Honest owners of one pretrained model lie at comparable distances from their merge."""
    if len(distances) < 2:
        return None
    nearest = min(distances, key=distances.__getitem__)
    others = min(d for owner, d in distances.items() if owner != nearest)
    return nearest if distances[nearest] < factor * others else None


def matches(declared: float, actual: float) -> bool:
    """What a site sent against what its layout declared (the same computation on the same tensor at the site)."""
    return abs(declared - actual) <= 1e-6 * max(abs(declared), abs(actual), 1e-30)
