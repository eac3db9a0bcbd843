"""Secure aggregation with dropout recovery (after Bonawitz et al., CCS 2017), for an honest-but-curious server.

Steps, each one message exchange through the server:

1. ``keys``: every owner makes a fresh X25519 key pair for sealing shares and publishes its public half. The
   server sends the roster of everyone who answered to everyone, with the masked rounds of the run: ``bounds``,
   then ``sums/1`` … ``sums/P``, one per part of the model (the server decodes, solves and frees one part before
   the next, so that its memory does not grow with the model).
2. ``shares``: for every masked round an owner makes a mask key pair and draws a self-mask seed, publishes the
   key's public half, and Shamir-splits, for every owner on the roster, its seeds and its round mask keys; each
   share travels sealed (ChaCha20-Poly1305 under a key agreed with the recipient), so the server routes shares it
   cannot read. An owner also publishes a hash of each seed, so that a wrong reconstruction is detected. Every
   round has secrets of its own: revealing an owner's mask key to recover it in one part says nothing of its
   masks in another part, where its seed may have been revealed.
3. a masked round: each participant adds to its fixed-point vector its self mask and,
   for every other participant, a pairwise mask it shares with that one (added by the lower node id, subtracted
   by the higher): pairwise masks cancel in the sum, self masks do not.
4. ``unmask``: the server names who answered (survivors) and who did not (dropped); each survivor returns its
   shares of the survivors' self-mask seeds and of the dropped owners' mask keys for that round, never both for
   one owner. With ``threshold`` of them the server removes the survivors' self masks and the dropped owners'
   pairwise masks, and is left with the survivors' sum, and nothing else.

An owner that drops before step 3 is simply not a participant; one that drops during a masked round is recovered
in its unmask step, and the merge goes on as long as ``threshold`` owners remain. Everything an owner keeps between
steps is in :attr:`OwnerSession.state`, plain bytes and strings that Flower keeps in the node's context.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import numpy as np

from .crypto import (
    SHARE_BYTES,
    SecureProtocolError,
    combine_shares,
    derive_key,
    expand,
    keystream,
    new_private_key,
    public_key,
    seal,
    split_secret,
    unseal,
)

BOUNDS = "bounds"  # the first masked round: magnitudes, to fix the fixed-point scales; then the sums, part by part
SUMS = "sums/"
MAX_PARTS = 4096  # a site refuses a run of more sums rounds than this (each costs a key pair and shares per peer)
SHARE_KEY = "share"
Layout = list[tuple[str, tuple[int, ...]]]
Roster = dict[int, dict[str, bytes]]  # node id -> public keys by purpose (SHARE_KEY and each round)


def sums_round(part: int) -> str:
    """The masked round of the sums of part ``part`` (from 1)."""
    return f"{SUMS}{part}"


def round_names(parts: int) -> list[str]:
    """A run's masked rounds: ``bounds``, then one per part of the sums."""
    return [BOUNDS, *(sums_round(part) for part in range(1, parts + 1))]


def check_rounds(rounds: list[str]) -> None:
    if not (1 <= len(rounds) - 1 <= MAX_PARTS) or list(rounds) != round_names(len(rounds) - 1):
        raise SecureProtocolError(f"the masked rounds must be {BOUNDS!r} then 'sums/1' … 'sums/P' (P at most "
                                  f"{MAX_PARTS}), not {list(rounds)[:4]}")


def default_threshold(owners: int) -> int:
    """A majority of the roster: fewer colluding owners than that, with the server, cannot unmask anyone."""
    return max(2, owners // 2 + 1)


def check_threshold(threshold: int, owners: int) -> None:
    """A threshold a site accepts: more than half the roster (and at least 2). At half or less, the server could
    tell two disjoint halves of the roster different dropout stories and recover an owner's masks from each half."""
    if not (max(2, owners // 2 + 1) <= threshold <= owners):
        raise SecureProtocolError(f"threshold {threshold} does not fit a roster of {owners} owners: it must be more "
                                  f"than half of them (at least {max(2, owners // 2 + 1)}) and at most all")


def seed_commitment(seed: bytes) -> bytes:
    return hashlib.sha256(b"gramfuse/seed/" + seed).digest()


def keys_digest(round_keys: Mapping[str, bytes]) -> bytes:
    """What an owner seals into every bundle: the digest of its round mask keys, so that a peer takes from the
    server only the keys the owner made (a server substituting one would strip that owner's pairwise masks)."""
    canonical = json.dumps({name: bytes(key).hex() for name, key in sorted(round_keys.items())})
    return hashlib.sha256(b"gramfuse/round-keys/" + canonical.encode()).digest()


def share_position(roster: Iterable[int], node: int) -> int:
    """The Shamir x of an owner: its place among the roster's node ids, from 1."""
    return sorted(roster).index(node) + 1


def _mask_sign(node: int, peer: int) -> int:
    return 1 if node < peer else -1


def flatten(layout: Layout, vectors: Mapping[str, np.ndarray]) -> np.ndarray:
    missing = [key for key, _ in layout if key not in vectors]
    if missing:
        raise SecureProtocolError(f"vector {missing[0]!r} of the agreed layout is missing")
    parts = []
    for key, shape in layout:
        part = np.ascontiguousarray(vectors[key], dtype=np.uint64).reshape(-1)
        if part.size != int(np.prod(shape, dtype=np.int64)):
            raise SecureProtocolError(f"vector {key!r} has {part.size} values, the layout says shape {shape}")
        parts.append(part)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def unflatten(layout: Layout, flat: np.ndarray) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for key, shape in layout:
        size = int(np.prod(shape, dtype=np.int64))
        out[key] = flat[start : start + size]
        start += size
    return out


ASKED_ALIKE = ("round", "participants", "method", "needs-statistics", "needs-fisher", "reference-label-set", "layout",
               "part", "scales", "dp-distributed")  # a masked request's fields that every participant must get alike


def request_digest(request: Mapping[str, object]) -> str:
    """The digest of what a masked round asks of every participant alike (the methods, the merged label set, the
    layout, the part, the scales, the noise): mixed into the pairwise masks, so that they cancel only where every
    participant was asked the same. A server asking one site differently from the others (``average`` of all but
    the target, which alone then adds Grams) gets noise, not that site's sums."""
    canonical = json.dumps({field: str(request.get(field, "")) for field in ASKED_ALIKE})
    return hashlib.sha256(canonical.encode()).hexdigest()


def _pairwise_stream(private: bytes, peer_public: bytes, round_name: str, session: str, count: int,
                     digest: str) -> np.ndarray:
    return keystream(derive_key(private, peer_public, f"mask/{round_name}/{digest}", session), count)


def _self_stream(seed: bytes, round_name: str, session: str, count: int) -> np.ndarray:
    return keystream(expand(seed, f"self-mask/{round_name}", session), count)


class OwnerSession:
    """One owner's side of one secure aggregation. ``state`` holds its secrets; it never leaves the site."""

    def __init__(self, state: Mapping[str, object]) -> None:
        self.state = dict(state)

    @classmethod
    def begin(cls, session: str, node: int) -> OwnerSession:
        return cls({"session": session, "node": int(node), "private/" + SHARE_KEY: new_private_key()})

    @property
    def session(self) -> str:
        return str(self.state["session"])

    @property
    def node(self) -> int:
        return int(self.state["node"])

    def public_keys(self) -> dict[str, bytes]:
        """The key the roster carries for this owner: the one its shares are sealed under."""
        return {SHARE_KEY: public_key(self._private(SHARE_KEY))}

    @property
    def rounds(self) -> list[str]:
        return list(json.loads(str(self.state["rounds"]))) if "rounds" in self.state else []

    def round_keys(self) -> dict[str, bytes]:
        """The public halves of this owner's mask keys, one per masked round (made with its shares)."""
        return {round_name: public_key(self._private(round_name)) for round_name in self.rounds}

    def _private(self, purpose: str) -> bytes:
        return bytes(self.state["private/" + purpose])

    def _roster(self) -> Roster:
        return {int(node): {k: bytes.fromhex(v) for k, v in keys.items()}
                for node, keys in json.loads(str(self.state["roster"])).items()}

    def _share_context(self, sender: int, recipient: int) -> str:
        return f"shares/{self.session}/{sender}->{recipient}"

    def share(self, roster: Roster, threshold: int, rounds: list[str] | None = None
              ) -> tuple[dict[int, bytes], dict[str, bytes], dict[str, bytes]]:
        """Sealed shares for every other owner on the roster, the public commitments to this owner's seeds, and the
        public halves of its mask keys, for ``rounds`` (default: ``bounds`` and one part of sums)."""
        rounds = round_names(1) if rounds is None else list(rounds)
        check_rounds(rounds)
        if self.node not in roster or roster[self.node].get(SHARE_KEY) != self.public_keys()[SHARE_KEY]:
            raise SecureProtocolError(f"node {self.node}: the roster does not carry this owner's keys")
        check_threshold(threshold, len(roster))
        if "roster" in self.state:
            raise SecureProtocolError(f"node {self.node}: shares were already made in session {self.session}")
        self.state["roster"] = json.dumps({str(n): {SHARE_KEY: keys[SHARE_KEY].hex()} for n, keys in roster.items()})
        self.state["threshold"] = int(threshold)
        self.state["rounds"] = json.dumps(rounds)
        positions = {node: share_position(roster, node) for node in roster}
        bundles: dict[int, bytes] = {node: b"" for node in roster}
        commitments = {}
        for round_name in rounds:
            self.state["private/" + round_name] = new_private_key()
            seed = new_private_key()  # 32 random bytes
            self.state["seed/" + round_name] = seed
            commitments[round_name] = seed_commitment(seed)
            for secret in (self._private(round_name), seed):
                shares = split_secret(secret, threshold, list(positions.values()))
                for node, x in positions.items():
                    bundles[node] += shares[x]
        digest = keys_digest(self.round_keys())
        bundles = {node: bundle + digest for node, bundle in bundles.items()}
        self.state[f"bundle/{self.node}"] = bundles.pop(self.node)
        sealed = {node: seal(derive_key(self._private(SHARE_KEY), roster[node][SHARE_KEY], "shares", self.session),
                             bundle, self._share_context(self.node, node)) for node, bundle in bundles.items()}
        return sealed, commitments, self.round_keys()

    def receive_shares(self, sealed: Mapping[int, bytes], round_keys: Mapping[int, Mapping[str, bytes]]) -> None:
        """Each peer's sealed shares for this owner and the public halves of its mask keys (both routed by the
        server with this owner's first masked request)."""
        roster, rounds = self._roster(), self.rounds
        for sender, message in sealed.items():
            if sender not in roster or sender == self.node:
                raise SecureProtocolError(f"node {self.node}: shares from node {sender}, who is not a peer")
            if f"bundle/{sender}" in self.state:
                raise SecureProtocolError(f"node {self.node}: shares from node {sender} were delivered already")
            keys = round_keys.get(sender, {})
            if sorted(keys) != sorted(rounds) or any(len(bytes(keys[r])) != len(self._private(r)) for r in rounds):
                raise SecureProtocolError(f"node {self.node}: node {sender}'s mask keys are not one per round of "
                                          "this run")
            key = derive_key(self._private(SHARE_KEY), roster[sender][SHARE_KEY], "shares", self.session)
            bundle = unseal(key, bytes(message), self._share_context(sender, self.node))
            if len(bundle) != 2 * len(rounds) * SHARE_BYTES + len(keys_digest({})):
                raise SecureProtocolError(f"node {self.node}: the bundle from node {sender} has the wrong size")
            if bundle[-len(keys_digest({})):] != keys_digest(keys):
                raise SecureProtocolError(f"node {self.node}: node {sender}'s mask keys are not the ones it made")
            self.state[f"bundle/{sender}"] = bundle
            self.state[f"round-keys/{sender}"] = json.dumps({r: bytes(keys[r]).hex() for r in rounds})

    def _peer_key(self, peer: int, round_name: str) -> bytes:
        return bytes.fromhex(json.loads(str(self.state[f"round-keys/{peer}"]))[round_name])

    def mask(self, round_name: str, participants: list[int], layout: Layout,
             vectors: Mapping[str, np.ndarray], digest: str = "") -> dict[str, np.ndarray]:
        """This owner's vectors (uint64, in ``layout``) masked for the sum over ``participants``, asked by a request
        of ``digest`` (:func:`request_digest`)."""
        if round_name not in self.rounds or f"participants/{round_name}" in self.state:
            raise SecureProtocolError(f"node {self.node}: round {round_name!r} is unknown or was already masked")
        roster = self._roster()
        peers = sorted(set(participants) - {self.node})
        if self.node not in participants or any(p not in roster for p in peers):
            raise SecureProtocolError(f"node {self.node}: participants of {round_name!r} not on the roster")
        unshared = [p for p in peers if f"bundle/{p}" not in self.state]
        if unshared:
            raise SecureProtocolError(f"node {self.node}: no shares from node {unshared[0]}, so it could not be "
                                      "recovered if it dropped; refusing to mask with it")
        if len(participants) < int(self.state["threshold"]):
            raise SecureProtocolError(f"node {self.node}: {len(participants)} participants, below the threshold")
        self.check_order(round_name, participants)
        self.state[f"participants/{round_name}"] = json.dumps(sorted(int(p) for p in participants))
        masked = flatten(layout, vectors).copy()
        masked += _self_stream(bytes(self.state["seed/" + round_name]), round_name, self.session, masked.size)
        for peer in peers:
            stream = _pairwise_stream(self._private(round_name), self._peer_key(peer, round_name), round_name,
                                      self.session, masked.size, digest)
            if _mask_sign(self.node, peer) > 0:
                masked += stream
            else:
                masked -= stream
        return unflatten(layout, masked)

    def check_order(self, round_name: str, participants: list[int]) -> None:
        """The rounds go in order, each after the previous was unmasked: bounds, then the parts. The first part's
        participants survived the bounds; every later part's are exactly the first part's survivors, so that each
        part of the model sums the same owners and the first part (which alone carries the owner-wide sums, charged
        to a DP budget and recorded in the ledger) comes before any other."""
        rounds = self.rounds
        if round_name not in rounds:
            raise SecureProtocolError(f"node {self.node}: round {round_name!r} is not one of this run")
        if rounds.index(round_name) == 0:
            return
        previous = rounds[rounds.index(round_name) - 1]
        if f"revealed/{previous}" not in self.state:
            raise SecureProtocolError(f"node {self.node}: round {round_name!r} asked before {previous!r} was unmasked")
        survived = set(json.loads(str(self.state[f"revealed/{previous}"]))["survivors"])
        if not (set(participants) <= survived if previous == BOUNDS else set(participants) == survived):
            raise SecureProtocolError(f"node {self.node}: the participants of {round_name!r} are not those that "
                                      f"survived {previous!r}")

    def reveal(self, round_name: str, survivors: list[int], dropped: list[int]) -> dict[int, bytes]:
        """Shares to unmask ``round_name``: of survivors' seeds and of dropped owners' mask keys, never both."""
        key = f"participants/{round_name}"
        if key not in self.state:
            raise SecureProtocolError(f"node {self.node}: asked to unmask {round_name!r}, which it never masked")
        if f"revealed/{round_name}" in self.state:
            raise SecureProtocolError(f"node {self.node}: round {round_name!r} was already unmasked")
        participants = set(json.loads(str(self.state[key])))
        survivors_set, dropped_set = set(survivors), set(dropped)
        if survivors_set & dropped_set or survivors_set | dropped_set != participants or self.node not in survivors_set:
            raise SecureProtocolError(
                f"node {self.node}: survivors and dropped owners of {round_name!r} do not split its participants"
            )
        if len(survivors_set) < int(self.state["threshold"]):
            raise SecureProtocolError(f"node {self.node}: {len(survivors_set)} survivors, below the threshold")
        if dropped_set and self.rounds.index(round_name) > 1:
            raise SecureProtocolError(f"node {self.node}: an owner lost after the first part is not recovered in "
                                      f"{round_name!r}: the earlier parts summed it, the run ends")
        self.state[f"revealed/{round_name}"] = json.dumps({"survivors": sorted(survivors_set),
                                                           "dropped": sorted(dropped_set)})
        index = self.rounds.index(round_name)
        revealed = {}
        for owner in participants:
            bundle = bytes(self.state[f"bundle/{owner}"])
            part = 2 * index + (1 if owner in survivors_set else 0)  # the seed of a survivor, the key of the dropped
            revealed[owner] = bundle[part * SHARE_BYTES : (part + 1) * SHARE_BYTES]
        return revealed


def shares_for(node: int, sealed: Mapping[int, Mapping[int, bytes]], participants: Iterable[int]) -> dict[int, bytes]:
    """The sealed shares the server forwards to ``node`` (with its first masked request): each other participant's
    share addressed to it. ``sealed[sender][recipient]``; a sender outside the participants sent none that count."""
    senders = set(participants) - {node}
    return {sender: by[node] for sender, by in sealed.items() if sender in senders and node in by}


class MaskedSum:
    """The server's side of one masked round: adds masked vectors, then removes what the revealed shares allow."""

    def __init__(self, round_name: str, session: str, roster: Roster, commitments: Mapping[int, Mapping[str, bytes]],
                 participants: Iterable[int], threshold: int, layout: Layout, digest: str = "") -> None:
        self.round_name, self.session, self.roster, self.digest = round_name, session, roster, digest
        self.commitments, self.threshold, self.layout = commitments, threshold, layout
        self.participants = sorted(participants)
        self.size = sum(int(np.prod(shape, dtype=np.int64)) for _, shape in layout)
        self.total = np.zeros(self.size, dtype=np.uint64)
        self.survivors: list[int] = []

    @property
    def dropped(self) -> list[int]:
        return [node for node in self.participants if node not in self.survivors]

    def check(self, node: int, vectors: Mapping[str, np.ndarray]) -> np.ndarray:
        if node not in self.participants or node in self.survivors:
            raise SecureProtocolError(f"node {node}: not a participant of {self.round_name!r}, or already added")
        extra = sorted(set(vectors) - {key for key, _ in self.layout})
        if extra:
            raise SecureProtocolError(f"node {node}: vector {extra[0]!r} is not in the agreed layout")
        for key, _ in self.layout:
            if key in vectors and np.asarray(vectors[key]).dtype != np.uint64:
                raise SecureProtocolError(f"node {node}: vector {key!r} is not uint64 (masked values are)")
        try:
            return flatten(self.layout, vectors)
        except SecureProtocolError as error:
            raise SecureProtocolError(f"node {node}: {error}") from None

    def add(self, node: int, vectors: Mapping[str, np.ndarray]) -> None:
        flat = self.check(node, vectors)
        self.total += flat  # uint64 addition wraps: the sum is modulo 2^64, as the masks need
        self.survivors.append(node)

    def unmask(self, revealed: Mapping[int, Mapping[int, bytes]]) -> dict[str, np.ndarray]:
        """The survivors' sum, from ``revealed[holder][owner]`` shares of at least ``threshold`` survivors."""
        if len(self.survivors) < self.threshold:
            raise SecureProtocolError(f"round {self.round_name!r}: {len(self.survivors)} owners answered, "
                                      f"the threshold is {self.threshold}")
        total = self.total.copy()
        for owner in self.participants:
            secret = self._recover(owner, revealed)
            if owner in self.survivors:
                total -= _self_stream(secret, self.round_name, self.session, self.size)
                continue
            for survivor in self.survivors:  # the masks the survivors added with the dropped owner
                stream = _pairwise_stream(secret, self.roster[survivor][self.round_name], self.round_name,
                                          self.session, self.size, self.digest)
                if _mask_sign(survivor, owner) > 0:
                    total -= stream
                else:
                    total += stream
        return unflatten(self.layout, total)

    def _recover(self, owner: int, revealed: Mapping[int, Mapping[int, bytes]]) -> bytes:
        """An owner's secret from its shares, checked against its public key or seed commitment. With more shares
        than the threshold, one wrong share (a faulty holder) is survived by leaving each holder out in turn."""
        shares = {share_position(self.roster, holder): bytes(by_owner[owner])
                  for holder, by_owner in revealed.items() if owner in by_owner and holder in self.survivors}
        if len(shares) < self.threshold:
            raise SecureProtocolError(f"round {self.round_name!r}: only {len(shares)} shares for node {owner}, "
                                      f"the threshold is {self.threshold}")
        positions = sorted(shares)
        subsets = [positions[: self.threshold]]
        if len(positions) > self.threshold:
            subsets += [[x for x in positions if x != left_out][: self.threshold] for left_out in positions]
        for subset in subsets:
            secret = self._valid_secret(owner, {x: shares[x] for x in subset})
            if secret is not None:
                return secret
        raise SecureProtocolError(f"round {self.round_name!r}: the shares of node {owner} do not reconstruct "
                                  "its secret (holders sent wrong shares)")

    def _valid_secret(self, owner: int, shares: dict[int, bytes]) -> bytes | None:
        try:
            secret = combine_shares(shares, self.threshold)
        except SecureProtocolError:
            return None
        if owner in self.survivors:
            valid = seed_commitment(secret) == bytes(self.commitments[owner][self.round_name])
        else:
            valid = public_key(secret) == self.roster[owner][self.round_name]
        return secret if valid else None
