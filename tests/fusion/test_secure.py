"""Secure aggregation in one process: fixed point, Shamir shares, masks with dropouts, and the merge it gives.

The reference everywhere is computed independently: the plain modular or float sum of the survivors' vectors, and
the plaintext aggregation path (`fusion.aggregate.Aggregator`) for the merge."""

import math

import numpy as np
import pytest
import torch
from helpers import (SecureRun, perturbed, plaintext_aggregator, plaintext_merge, save_owner, secure_merge, tiny_model,
                     write_data)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion.aggregate import owner_update
from fusion.methods import get_method
from fusion.secure import secure_contributions
from federation.crypto import SecureProtocolError, combine_shares, split_secret
from fusion.secure.fixedpoint import (
    ABOVE_BOUND,
    BAND_BITS,
    BOUND_FACTOR,
    FixedPointError,
    agreed_band,
    bound_bands,
    decode,
    encode,
    fraction_bits,
    magnitude_bands,
)
from federation.protocol import default_threshold, sums_round
from fusion.workflows import DataSettings, compute_statistics

# --- fixed point ----------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(owners=st.integers(1, 9), exponent=st.integers(-40, 40), seed=st.integers(0, 2**31))
def test_fixed_point_sum_is_the_float_sum_to_its_scale(owners, exponent, seed):
    generator = torch.Generator().manual_seed(seed)
    values = [torch.randn(50, generator=generator, dtype=torch.float64) * 2.0**exponent for _ in range(owners)]
    histogram = sum(magnitude_bands({"t": v})["t"] for v in values)
    bits = fraction_bits(histogram, owners)
    total = np.zeros(50, dtype=np.uint64)
    for value in values:
        total += encode("t", value, bits, owners)
    decoded = decode("t", total, bits, (50,))
    exact = [math.fsum(float(v[i]) for v in values) for i in range(50)]  # correctly rounded
    for got, want in zip(decoded.tolist(), exact):
        # rounding each owner's value to the scale, then the decoded integer to float64
        assert abs(got - want) <= owners * 2.0 ** (-bits - 1) + 2 * math.ulp(want)
    # the scale is as fine as the headroom allows: at most one band coarser than the largest entry needs
    largest = float(torch.stack(values).abs().max())
    assert bits >= 61 - BAND_BITS - math.frexp(largest)[1] - math.ceil(math.log2(owners))


def test_a_magnitude_that_would_not_encode_is_refused_before_any_part():
    """The check a site makes at the first part, from the largest magnitudes it noted in the bounds round, refuses
    exactly what encoding would refuse later."""
    from fusion.secure.fixedpoint import SUM_BITS, check_encodable, headroom_bits

    owners, bits = 5, 20
    limit = 2.0 ** (SUM_BITS - headroom_bits(owners) - bits)  # the largest magnitude that encodes at this scale
    check_encodable({"t": limit, "u": 1e30}, {"t": bits}, owners)  # "u" is in no part asked: not checked
    encode("t", torch.tensor([limit]), bits, owners)
    with pytest.raises(FixedPointError, match="'t': its largest value, .*, is beyond the range agreed") as refused:
        check_encodable({"t": limit * 1.001}, {"t": bits}, owners)
    assert ABOVE_BOUND in refused.value.public  # what the server is told, and why it counts the site as a misfit
    with pytest.raises(FixedPointError):
        encode("t", torch.tensor([limit * 1.001]), bits, owners)


def test_fixed_point_hand_computed():
    bits = 4  # scale 1/16
    total = encode("t", torch.tensor([1.5, -0.25]), bits, 2) + encode("t", torch.tensor([0.0625, -3.0]), bits, 2)
    assert decode("t", total, bits, (2,)).tolist() == [1.5625, -3.25]


def test_value_beyond_the_agreed_range_is_an_error_naming_the_tensor():
    histogram = magnitude_bands({"gram/x": torch.tensor([3.0])})["gram/x"]
    bits = fraction_bits(histogram, 4)
    encode("gram/x", torch.tensor([3.0, -3.0]), bits, 4)
    with pytest.raises(FixedPointError, match="'gram/x'.*beyond the range"):
        encode("gram/x", torch.tensor([1e12]), bits, 4)
    with pytest.raises(FixedPointError, match="'gram/x'"):
        encode("gram/x", torch.tensor([float("nan")]), bits, 4)


def test_overflowed_sum_is_detected():
    bits = fraction_bits(magnitude_bands({"t": torch.tensor([1.0])})["t"], 2)
    forged = np.array([2**62 + 5], dtype=np.uint64)  # what a sum beyond every honest encoding decodes to
    with pytest.raises(FixedPointError, match="'t'.*overflowed"):
        decode("t", forged, bits, (1,))


# --- Shamir ---------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(holders=st.integers(2, 8), data=st.data())
def test_any_threshold_shares_recover_the_secret_and_fewer_do_not(holders, data):
    threshold = data.draw(st.integers(2, holders))
    secret = data.draw(st.binary(min_size=32, max_size=32))
    shares = split_secret(secret, threshold, list(range(1, holders + 1)))
    chosen = data.draw(st.permutations(list(shares)))[:threshold]
    assert combine_shares({x: shares[x] for x in chosen}, threshold) == secret
    with pytest.raises(SecureProtocolError):
        combine_shares({x: shares[x] for x in chosen[:-1]}, threshold)
    if threshold > 2:  # interpolating too few shares as if the threshold were lower gives no secret, or another
        try:
            assert combine_shares({x: shares[x] for x in chosen[:-1]}, threshold - 1) != secret
        except SecureProtocolError:
            pass


# --- the protocol ---------------------------------------------------------------------------------------------------

LAYOUT = [("a", (3, 4)), ("b", (5,))]


def random_vectors(seed):
    generator = np.random.default_rng(seed)
    return {key: generator.integers(0, 2**64, size=int(np.prod(shape)), dtype=np.uint64) for key, shape in LAYOUT}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(owners=st.integers(3, 6), data=st.data())
def test_masked_sums_equal_the_survivors_sums_whoever_drops(owners, data):
    nodes = [1000 + 7 * i for i in range(owners)]
    threshold = default_threshold(owners)
    spare = owners - threshold
    drop_bounds = set(data.draw(st.lists(st.sampled_from(nodes), max_size=spare, unique=True)))
    left = [n for n in nodes if n not in drop_bounds]
    drop_sums = set(data.draw(st.lists(st.sampled_from(left), max_size=len(left) - threshold, unique=True)))
    run = SecureRun(nodes, threshold)
    vectors = {node: random_vectors(node) for node in nodes}
    totals, survivors = run.masked_round("bounds", nodes, LAYOUT, vectors.get, drop_before=drop_bounds)
    assert sorted(survivors) == sorted(left)
    for key, _ in LAYOUT:
        expected = sum((vectors[n][key] for n in left), np.zeros_like(vectors[left[0]][key]))
        assert np.array_equal(totals[key], expected)
    totals, survivors = run.masked_round(sums_round(1), survivors, LAYOUT, vectors.get, drop_before=drop_sums)
    kept = [n for n in left if n not in drop_sums]
    for key, _ in LAYOUT:
        expected = sum((vectors[n][key] for n in kept), np.zeros_like(vectors[kept[0]][key]))
        assert np.array_equal(totals[key], expected)


def test_every_part_is_a_masked_round_with_secrets_of_its_own():
    """The sums go part by part, each part a round with its own mask keys and seeds, in order after the bounds: an
    owner dropped in the first part is recovered; later parts sum exactly the first part's survivors, and one lost
    there is not recovered (the earlier parts summed it)."""
    nodes = [1, 2, 3, 4, 5]
    run = SecureRun(nodes, 3, parts=3)
    vectors = {node: random_vectors(node) for node in nodes}
    with pytest.raises(SecureProtocolError, match="asked before 'bounds' was unmasked"):
        run.masked_round(sums_round(1), nodes, LAYOUT, vectors.get)
    run = SecureRun(nodes, 3, parts=3)
    _, survivors = run.masked_round("bounds", nodes, LAYOUT, vectors.get)
    with pytest.raises(SecureProtocolError, match="asked before 'sums/1' was unmasked"):
        run.sessions[1].mask(sums_round(2), nodes, LAYOUT, vectors[1])
    totals, survivors = run.masked_round(sums_round(1), survivors, LAYOUT, vectors.get, drop_before={4})
    assert sorted(survivors) == [1, 2, 3, 5]
    expected = sum((vectors[n]["a"] for n in survivors), np.zeros(12, dtype=np.uint64))
    assert np.array_equal(totals["a"], expected)
    with pytest.raises(SecureProtocolError, match="are not those that survived 'sums/1'"):
        run.sessions[1].mask(sums_round(2), nodes, LAYOUT, vectors[1])  # node 4 again
    totals, _ = run.masked_round(sums_round(2), survivors, LAYOUT, vectors.get)
    assert np.array_equal(totals["a"], expected)
    with pytest.raises(SecureProtocolError, match="lost after the first part is not recovered"):
        run.masked_round(sums_round(3), survivors, LAYOUT, vectors.get, drop_before={5})
    state = run.sessions[4].state
    secrets_of_4 = [state[f"{kind}/{name}"] for kind in ("private", "seed") for name in ("bounds", *map(sums_round,
                                                                                                       (1, 2, 3)))]
    assert len(set(secrets_of_4)) == len(secrets_of_4)  # no two rounds share a key or a seed
    with pytest.raises(SecureProtocolError, match="unknown or was already masked"):
        run.sessions[1].mask(sums_round(4), nodes, LAYOUT, vectors[1])  # a round the run did not agree on
    with pytest.raises(SecureProtocolError, match="masked rounds must be"):
        SecureRun(nodes, 3, parts=0)


def test_masks_cancel_only_where_every_participant_was_asked_alike():
    """A server asking one site differently from the others (all but the target told ``average``, so that only
    the target adds Grams) gets noise: the digest of what each was asked is in its pairwise masks."""
    from federation.protocol import MaskedSum, request_digest

    nodes = [1, 2, 3]
    asked = {"round": "bounds", "method": "regmean", "layout": "[]"}
    honest, other = request_digest(asked), request_digest({**asked, "method": "average"})
    assert honest != other and request_digest(dict(asked)) == honest
    vectors = {node: random_vectors(node) for node in nodes}
    for digests, exact in (({1: honest, 2: honest, 3: honest}, True), ({1: honest, 2: other, 3: other}, False)):
        run = SecureRun(nodes, 2)
        for node in nodes:
            run.deliver(node, nodes)
        summed = MaskedSum("bounds", "test", run.roster, run.commitments, nodes, 2, LAYOUT, honest)
        for node in nodes:
            summed.add(node, run.sessions[node].mask("bounds", nodes, LAYOUT, vectors[node], digests[node]))
        totals = summed.unmask({n: run.sessions[n].reveal("bounds", nodes, []) for n in nodes})
        expected = sum((vectors[n]["a"] for n in nodes), np.zeros(12, dtype=np.uint64))
        assert np.array_equal(totals["a"], expected) == exact


def test_round_keys_are_the_ones_their_owner_sealed_and_arrive_once():
    """The server routes each owner's round mask keys; a key it substituted would strip that owner's pairwise masks,
    so every bundle carries, sealed, the digest of its sender's keys. A second delivery is refused too."""
    run = SecureRun([1, 2, 3], 2, parts=2)
    forged = {**run.round_keys[2], sums_round(1): run.round_keys[3][sums_round(1)]}
    with pytest.raises(SecureProtocolError, match="not the ones it made"):
        run.sessions[1].receive_shares({2: run.sealed[2][1]}, {2: forged})
    run.sessions[1].receive_shares({2: run.sealed[2][1]}, {2: run.round_keys[2]})
    with pytest.raises(SecureProtocolError, match="delivered already"):
        run.sessions[1].receive_shares({2: run.sealed[2][1]}, {2: run.round_keys[2]})


def test_masked_vector_looks_random_and_fewer_than_threshold_cannot_unmask():
    nodes = [1, 2, 3, 4, 5]
    run = SecureRun(nodes, 3)
    vectors = {node: {"a": np.arange(12, dtype=np.uint64), "b": np.zeros(5, dtype=np.uint64)} for node in nodes}
    for node in run.sessions:
        run.deliver(node, nodes)
    masked = run.sessions[1].mask("bounds", nodes, LAYOUT, vectors[1])
    assert not np.array_equal(masked["b"], vectors[1]["b"])
    assert np.all(masked["a"] != vectors[1]["a"])  # every word masked (equal by chance: 2^-64 each)
    from federation.protocol import MaskedSum

    summed = MaskedSum("bounds", "test", run.roster, run.commitments, nodes, 3, LAYOUT)
    for node in nodes:
        summed.add(node, masked if node == 1 else run.sessions[node].mask("bounds", nodes, LAYOUT, vectors[node]))
    revealed = {n: run.sessions[n].reveal("bounds", nodes, []) for n in (1, 2)}
    with pytest.raises(SecureProtocolError, match="only 2 shares for node"):
        summed.unmask(revealed)
    revealed[3] = run.sessions[3].reveal("bounds", nodes, [])
    assert np.array_equal(summed.unmask(revealed)["a"], 5 * np.arange(12, dtype=np.uint64))


def test_owner_refuses_to_reveal_both_secrets_of_one_owner_or_twice():
    nodes = [1, 2, 3, 4]
    run = SecureRun(nodes, 3)
    for node in run.sessions:
        run.deliver(node, nodes)
        run.sessions[node].mask("bounds", nodes, LAYOUT, random_vectors(node))
    with pytest.raises(SecureProtocolError, match="do not split"):
        run.sessions[1].reveal("bounds", [1, 2, 3, 4], [4])  # node 4 both survived and dropped
    with pytest.raises(SecureProtocolError, match="below the threshold"):
        run.sessions[1].reveal("bounds", [1, 2], [3, 4])
    run.sessions[1].reveal("bounds", [1, 2, 3], [4])
    with pytest.raises(SecureProtocolError, match="already unmasked"):
        run.sessions[1].reveal("bounds", [1, 2, 3, 4], [])
    with pytest.raises(SecureProtocolError, match="never masked"):
        run.sessions[1].reveal(sums_round(1), [1, 2, 3], [4])


@pytest.mark.parametrize("owners, refused, accepted", [(5, [1, 2], [3, 5]), (4, [2], [3, 4]), (3, [1], [2, 3]),
                                                      (2, [1], [2])])
def test_sites_refuse_a_threshold_of_half_the_roster_or_less(owners, refused, accepted):
    """With a threshold of half or less, two disjoint halves could each be told the other dropped out, and each
    would reveal its masks to the server: a site refuses such a threshold before sending any share."""
    nodes = list(range(1, owners + 1))
    for threshold in refused:
        with pytest.raises(SecureProtocolError, match="more than half"):
            SecureRun(nodes, threshold)
    for threshold in accepted:
        SecureRun(nodes, threshold)


def test_tampered_or_misrouted_share_is_an_error():
    run = SecureRun([1, 2, 3], 2)
    forged = bytearray(run.sealed[2][1])
    forged[-1] ^= 1
    with pytest.raises(SecureProtocolError, match="does not decrypt"):
        run.sessions[1].receive_shares({2: bytes(forged)}, {2: run.round_keys[2]})
    with pytest.raises(SecureProtocolError, match="does not decrypt"):
        run.sessions[1].receive_shares({2: run.sealed[3][1]}, {2: run.round_keys[2]})  # node 3's, presented as 2's


def test_wrong_share_is_detected_by_the_commitment_and_survived_with_a_spare():
    nodes = [1, 2, 3]
    run = SecureRun(nodes, 2)
    for node in run.sessions:
        run.deliver(node, nodes)
    from federation.protocol import MaskedSum

    summed = MaskedSum("bounds", "test", run.roster, run.commitments, nodes, 2, LAYOUT)
    for node in nodes:
        summed.add(node, run.sessions[node].mask("bounds", nodes, LAYOUT, random_vectors(node)))
    revealed = {n: run.sessions[n].reveal("bounds", nodes, []) for n in nodes}
    revealed[1] = {**revealed[1], 2: bytes(66)}
    expected = sum((random_vectors(n)["a"] for n in nodes), np.zeros(12, dtype=np.uint64))
    assert np.array_equal(summed.unmask(revealed)["a"], expected)  # one more share than needed: the bad one is left out
    revealed = {1: revealed[1], 2: revealed[2]}  # exactly the threshold, one share wrong
    with pytest.raises(SecureProtocolError, match="node 2 do not reconstruct"):
        summed.unmask(revealed)


# --- the merge ------------------------------------------------------------------------------------------------------


def owner_updates(base, root, count, seed, name="owner", examples=24):
    """``count`` perturbed copies of ``base`` saved under ``root``, each with statistics over its own data."""
    updates = []
    for i in range(count):
        model = perturbed(base, seed=seed + i)
        folder = save_owner(model, root / f"{name}{i}")
        stats, _ = compute_statistics(folder, write_data(root / f"{name}{i}.jsonl", examples + 8 * i, seed=i),
                                      settings=DataSettings(max_length=16, batch_size=8), progress=False, model=model)
        updates.append(owner_update(f"{name}{i}", model, stats))
    return updates


@pytest.fixture(scope="module")
def owners(tmp_path_factory):
    return owner_updates(tiny_model("bert"), tmp_path_factory.mktemp("secure-owners"), 5, seed=40)


def close(got, expected, tolerance=1e-9):
    """Every tensor of ``expected`` in ``got``, equal to ``tolerance`` relative to its largest entry."""
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        scale = value.abs().max().clamp_min(1e-30)
        assert float((got[name] - value).abs().max() / scale) <= tolerance, name


def test_secure_merge_equals_plaintext_with_owners_dropping_in_each_round(owners, tmp_path):
    from fusion.secure import BODY

    methods = [get_method("regmean"), get_method("regmean", alpha=0.5), get_method("average"),
               get_method("weighted-average")]
    sums, merged, survivors = secure_merge(methods, owners, tmp_path / "secure", drop_bounds={2}, drop_sums={5})
    assert [o.name for o in survivors] == ["owner0", "owner2", "owner3"]
    for index, method in enumerate([methods[0], methods[2], methods[3]]):  # the sums: what the server decodes
        body = {key[len(f"{index}/{BODY}"):]: value for key, value in sums.items() if key.startswith(f"{index}/{BODY}")}
        close(body, dict(plaintext_aggregator(method, survivors).body))
    for method in methods:  # the merges
        close(merged[method.label()]["."], plaintext_merge(method, survivors, tmp_path / method.label())["."])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0.0, 1.2))
def test_the_sums_in_parts_merge_exactly_as_all_at_once(owners, tmp_path_factory, fraction):
    """The server's parts of the secure sums: every sum in exactly one part, the owner-wide ones in the first, each
    part under part_bytes unless one group alone is larger; fed part by part to the finish (the first part's
    owner-wide sums kept), the merge is the one of all the sums at once."""
    from helpers import read_outputs

    from fusion.finish import method_roots
    from fusion.secure import (finish_from_sums, layout_of, owner_wide, secure_finisher, sums_of_decoded, sums_parts,
                               sums_plan)

    methods = [get_method("regmean", alpha=0.7), get_method("average")]
    sums = {}
    for owner in owners:
        for key, value in secure_contributions(methods, owner, with_head=True).items():
            sums[key] = sums[key] + value.double() if key in sums else value.double()
    layout = layout_of(sums)
    total = 16 * sum(int(np.prod(shape)) for _, shape in layout)
    part_bytes = int(fraction * total)
    modules = dict(owners[0].statistics.modules)
    groups = sums_plan(methods, sums, modules)
    parts = sums_parts(layout, groups, part_bytes)
    keys = [key for _, part in parts for key, _ in part]
    assert sorted(keys) == sorted(sums) and len(keys) == len(set(keys))
    assert [g for part_groups, _ in parts for g in part_groups] == groups
    assert set(owner_wide(sums)) <= {key for key, _ in parts[0][1]}
    for part_groups, part in parts:
        size = 16 * sum(int(np.prod(shape)) for _, shape in part)
        assert size <= part_bytes or len(part_groups) == 1
    assert (len(parts) == 1) == (part_bytes >= total)

    root = tmp_path_factory.mktemp("parts")
    labels = owners[0].label_set
    members = {owner.name: (owner.label_set, owner.config) for owner in owners}
    whole = method_roots(root / "whole", methods)
    finish_from_sums(whole, methods, sums, _context(modules), members, {},
                     labels, report={}, dtype=torch.float64)
    in_parts = method_roots(root / "in-parts", methods)
    finisher = secure_finisher(in_parts, methods, groups, _context(modules), members, {}, labels,
                               dtype=torch.float64)
    shared = {}
    for index, (part_groups, part) in enumerate(parts):
        decoded = {key: sums[key] for key, _ in part}
        shared = owner_wide(decoded) if index == 0 else shared
        finisher.add(part_groups, sums_of_decoded(methods, {**decoded, **shared}))
    finisher.close({})
    for method in methods:
        expected, got = read_outputs(whole[method.label()]), read_outputs(in_parts[method.label()])
        assert got.keys() == expected.keys()
        for folder in expected:
            assert got[folder].keys() == expected[folder].keys()
            assert all(torch.equal(got[folder][n], expected[folder][n]) for n in expected[folder])


def test_a_contribution_formed_group_by_group_is_the_whole_one(owners):
    """What a site sends in parts (and forms a group at a time for the keys and bounds rounds): each group's
    contribution holds exactly the whole contribution's values for that group, and every one of them holds the
    owner-wide sums of both sides, the head's too, whether or not the group is in the head."""
    from fusion.finish import plan_groups
    from fusion.secure import owner_wide

    methods = [get_method("regmean", alpha=0.5), get_method("average")]
    owner = owners[1]
    whole = secure_contributions(methods, owner, with_head=True)
    assert any("/head/" in key for key in owner_wide(whole))
    groups = plan_groups(list(owner.params), set(owner.head), owner.statistics.modules)
    formed = {}
    for group in groups:
        chunk = secure_contributions(methods, owner, with_head=True, names=group.keys)
        assert owner_wide(chunk).keys() == owner_wide(whole).keys()
        for key, value in chunk.items():
            assert torch.equal(value, whole[key]), key
        formed.update(chunk)
    assert formed.keys() == whole.keys()


def _context(modules):
    from fusion.methods import MergeContext

    return MergeContext(modules=modules)


def test_secure_merge_of_causal_lms_equals_plaintext_under_both_tie_rules(tmp_path):
    """Tied LM heads through the masked rounds: one tensor, and either rule gives the plaintext merge."""
    from helpers import tiny_causal_lm

    updates = owner_updates(tiny_causal_lm(), tmp_path, 3, seed=60, name="lm", examples=16)
    assert "lm_head.weight" not in updates[0].params
    methods = [get_method("regmean"), get_method("regmean", tied="embedding")]
    _, merged, _ = secure_merge(methods, updates, tmp_path / "secure")
    head, embedding = (merged[m.label()]["."]["model.embed_tokens.weight"] for m in methods)
    assert float((head - embedding).abs().max()) > 1e-3  # the two rules differ
    for method in methods:
        close(merged[method.label()]["."], plaintext_merge(method, updates, tmp_path / method.label())["."])


def test_secure_mode_refuses_methods_that_need_the_base(owners):
    from fusion.errors import MergeError

    with pytest.raises(MergeError, match="task-arithmetic.*plaintext mode"):
        secure_contributions([get_method("task-arithmetic")], owners[0], with_head=True)
    with pytest.raises(MergeError, match="lines_alpha=0.5.*plaintext mode"):  # LiNeS on RegMean reads the base too
        secure_contributions([get_method("regmean", lines_alpha=0.5)], owners[0], with_head=True)


def test_owner_with_its_own_label_set_gets_the_merged_body_and_its_head(owners, tmp_path):
    """Its body goes into the secure sums; its head, which nobody can be summed with, only into its own folder."""

    three_labels = tiny_model("bert", num_labels=3)
    three_labels.bert.load_state_dict(perturbed(tiny_model("bert"), seed=49).bert.state_dict())
    folder = save_owner(three_labels, tmp_path / "topics")
    stats, _ = compute_statistics(folder, write_data(tmp_path / "topics.jsonl", 32, seed=9, num_labels=3),
                                  settings=DataSettings(max_length=16, batch_size=8), progress=False, model=three_labels)
    updates = [*owners[:3], owner_update("topics", three_labels, stats)]
    method = get_method("regmean")
    _, merged, _ = secure_merge([method], updates, tmp_path / "secure")
    plaintext = plaintext_merge(method, updates, tmp_path / "plaintext")  # the same rule: "." and the topics owner
    assert merged["regmean"].keys() == plaintext.keys() == {".", "topics"}
    close(merged["regmean"]["topics"], plaintext["topics"])
    head = updates[3].split()[1]
    assert all(torch.equal(merged["regmean"]["topics"][name], head[name].double()) for name in head)
    # the merged model's head is the two-label owners' head, merged as if the topics owner were not there
    reference_head = plaintext_merge(method, owners[:3], tmp_path / "three")["."]
    for name in updates[0].split()[1]:
        value = reference_head[name]
        assert float((merged["regmean"]["."][name] - value).abs().max() / value.abs().max()) <= 1e-9


def test_malformed_masked_vectors_are_refused_naming_the_owner_and_change_nothing():
    from federation.protocol import MaskedSum

    run = SecureRun([1, 2, 3], 2)
    summed = MaskedSum("bounds", "test", run.roster, run.commitments, [1, 2, 3], 2, LAYOUT)
    good = random_vectors(1)
    summed.add(1, good)
    before = summed.total.copy()
    cases = {
        "not uint64": {"a": good["a"].astype(np.float64), "b": good["b"]},
        "missing": {"a": good["a"]},
        "has 4 values": {"a": good["a"], "b": good["b"][:4]},
        "not in the agreed layout": {**good, "c": good["b"]},
    }
    for message, vectors in cases.items():
        with pytest.raises(SecureProtocolError, match=f"node 2: .*{message}"):
            summed.add(2, vectors)
    with pytest.raises(SecureProtocolError, match="node 1: not a participant .* or already added"):
        summed.add(1, good)
    assert np.array_equal(summed.total, before) and summed.survivors == [1]


# --- the agreed bound -------------------------------------------------------------------------------------------------


def test_the_scale_follows_the_median_owner_and_an_owner_far_above_cannot_encode():
    honest = [torch.tensor([3.0, -1.0]), torch.tensor([2.0, 0.5]), torch.tensor([-4.0, 1.0])]
    inflated = torch.tensor([3.0e12, 1.0])  # a site whose statistics are 1e12 times the others'
    histogram = sum(magnitude_bands({"g": v})["g"] for v in [*honest, inflated])
    median_band = magnitude_bands({"g": honest[0]})["g"].argmax()
    assert agreed_band(histogram) == (median_band + bound_bands(BOUND_FACTOR), 1)  # the outlier counted, not named
    bits = fraction_bits(histogram, 4)
    total = sum(encode("g", value, bits, 4) for value in honest)
    assert decode("g", total, bits, (2,)).tolist() == [1.0, 0.5]
    with pytest.raises(FixedPointError) as raised:
        encode("g", inflated, bits, 4)
    assert ABOVE_BOUND in raised.value.public and "3e+12" not in raised.value.public  # no value leaves the site
    # without a bound the inflated site sets the scale, as before, and encodes
    loose = fraction_bits(histogram, 4, bound_bands(0))
    assert agreed_band(histogram, None)[1] == 0 and loose < bits
    encode("g", inflated, loose, 4)


def test_a_bound_admits_honest_spread_and_ignores_owners_adding_zeros():
    # factor 65536 is 8 bands: owners 1000 times apart (more data, larger Grams) stay within it
    spread = [torch.tensor([1.0]), torch.tensor([1.0e3]), torch.tensor([30.0])]
    histogram = sum(magnitude_bands({"g": v})["g"] for v in spread)
    assert agreed_band(histogram)[1] == 0
    zeros = sum(magnitude_bands({"g": v})["g"] for v in [torch.zeros(2)] * 3 + [torch.tensor([5.0, 1.0])])
    assert agreed_band(zeros) == (int(magnitude_bands({"g": torch.tensor([5.0])})["g"].argmax()), 0)
    assert bound_bands(65536) == 8 and bound_bands(100) == 4 and bound_bands(float("inf")) is None
    with pytest.raises(ValueError, match="at least 1"):
        bound_bands(0.5)
