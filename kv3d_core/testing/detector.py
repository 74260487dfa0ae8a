"""Conformance tests of the prefix detector contract, :class:`~kv3d_core.contracts.PrefixDetector`.

Subclass :class:`DetectorContract` and provide a ``detector`` fixture.

A detector is policy only: the core owns the radix index that finds candidates (it
compares token ids and never looks outside the request's namespace), so these tests
check what the detector decides -- the family key and how much of a candidate may be
reused -- not the index.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from kv3d_core.contracts.detector import Candidate, FamilyKey, PrefixDetector, PromptView

MODEL = "kv3d-contract-model"


def prompt(tokens, family_len: int, *, model_id: str = MODEL, cache_salt: str | None = None,
           tenant: str | None = None) -> PromptView:
    return PromptView(tokens, family_len, model_id, cache_salt, tenant)


def _tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50_000, n).tolist()


def sample_prompts() -> list[PromptView]:
    """Prompts with and without a family part, of several lengths, namespaces and token types."""
    out = [prompt([], 0), prompt([7], 0), prompt([7], 1), prompt([0, 2**31 - 1], 2)]
    for seed, (n, fam) in enumerate([(40, 0), (40, 16), (200, 64), (200, 199), (1000, 512), (65, 64)]):
        toks = _tokens(seed, n)
        out.append(prompt(toks, fam))
        out.append(prompt(toks, fam, cache_salt="salt", tenant="tenant-a"))
    out.append(prompt(np.array(_tokens(99, 80), np.int32), 32))
    out.append(prompt(tuple(_tokens(98, 80)), 32, model_id="another-model"))
    return out


class DetectorContract:
    """The :class:`~kv3d_core.contracts.PrefixDetector` contract, for a detector's own tests.

    Provide the fixture ``detector`` (an instance, settings as configured).

    Class attribute:

    - ``reuses_own_family`` (default True): a request may reuse its own family's snapshot
      when it holds all of it, and a cached turn of its own family past the family prefix
      (the cases the prefix cache exists for). Tested with family prefixes of 64 tokens;
      set False for a detector that never reuses anything.
    """

    reuses_own_family: bool = True

    @pytest.fixture
    def detector(self) -> PrefixDetector:
        pytest.fail(f"{type(self).__name__} must define a `detector` fixture returning the detector under test")

    # -- identity ------------------------------------------------------------------------------------------
    def test_identity(self, detector):
        assert isinstance(detector, PrefixDetector)
        assert isinstance(detector.name, str) and detector.name and detector.name != "?"

    # -- family keys ---------------------------------------------------------------------------------------
    def test_family_key_is_well_formed(self, detector):
        """A :class:`FamilyKey` in the prompt's namespace (the core computes it), with a
        non-empty digest, ``0 <= length <= family_len`` (the snapshot holds family tokens
        only) and no ``snapshot_namespace`` (the core sets that, never a detector)."""
        for p in sample_prompts():
            key = detector.family(p)
            what = f"prompt of {len(p.tokens)} tokens, family_len {p.family_len}"
            assert isinstance(key, FamilyKey), f"{what}: family() returned {type(key).__name__}"
            assert key.namespace == p.namespace, \
                f"{what}: the key's namespace is not prompt.namespace (the core computes namespaces)"
            assert isinstance(key.digest, str) and key.digest, f"{what}: empty digest"
            assert isinstance(key.length, int) and 0 <= key.length <= p.family_len, \
                f"{what}: length {key.length} outside 0..family_len"
            assert key.snapshot_namespace is None, f"{what}: a detector must not set snapshot_namespace"

    def test_family_is_deterministic_and_stateless(self, detector):
        """The same prompt gets the same key, whatever was asked before and in any order."""
        prompts = sample_prompts()
        first = [detector.family(p) for p in prompts]
        for p in prompts:                       # some reuse decisions in between
            k = detector.family(p)
            detector.reusable(p, k, Candidate(k.digest, min(5, len(p.tokens)), len(p.tokens), "session"))
        assert [detector.family(p) for p in reversed(prompts)] == first[::-1]

    def test_family_depends_only_on_the_family_tokens(self, detector):
        """Prompts sharing their first ``family_len`` tokens (same model, salt, tenant) share
        the key, whatever follows and however the tokens are held (list, tuple, numpy)."""
        fam = _tokens(1, 64)
        keys = set()
        for seed, tail_len in enumerate([0, 1, 30, 500]):
            toks = fam + _tokens(100 + seed, tail_len)
            for held in (list(toks), tuple(toks), np.array(toks, np.int32), np.array(toks, np.int64)):
                keys.add(detector.family(prompt(held, 64)))
        assert len(keys) == 1, f"{len(keys)} different keys for one family"

    def test_different_family_tokens_give_different_keys(self, detector):
        """Family parts that differ anywhere (one token, or one a prefix of another) get
        different keys within one namespace."""
        base = _tokens(2, 200)
        variants = [prompt(base, n) for n in (16, 17, 63, 64, 65, 199, 200)]
        for at in (0, 31, 63):
            changed = list(base)
            changed[at] = (changed[at] + 1) % 50_000
            variants.append(prompt(changed, 64))
        variants += [prompt(_tokens(300 + s, 64), 64) for s in range(20)]
        keys = [detector.family(p) for p in variants]
        assert len(set(keys)) == len(keys), "two different family parts got the same key"
        assert len({k.namespace for k in keys}) == 1, "one model, salt and tenant must be one namespace"

    def test_families_are_keyed_in_the_prompts_namespace(self, detector):
        """Every (model, cache salt, tenant) is a namespace of its own -- the core computes
        it (:attr:`PromptView.namespace`) -- and the detector's key is in it, whatever the
        model, salt and tenant (including values that differ only in which field holds a
        string)."""
        toks = _tokens(3, 100)
        combos = list(itertools.product(["model-a", "model-b"], [None, "s1", "s2"], [None, "t1", "t2"]))
        combos += [("model-a", "t1", None), ("model-a", None, "s1"), ("model-as1", None, None),
                   ("model-a", "t1s1", None), ("model-a", "1", "t1s"), ("model-a", "s1", "t")]
        for model_id, salt, tenant in dict.fromkeys(combos):
            p = prompt(toks, 32, model_id=model_id, cache_salt=salt, tenant=tenant)
            assert detector.family(p).namespace == p.namespace, (model_id, salt, tenant)

    # -- reuse -------------------------------------------------------------------------------------------------
    def _candidates(self, p: PromptView, key: FamilyKey, rng: np.random.Generator) -> list[Candidate]:
        n = len(p.tokens)
        other = key.digest[::-1] + "0"          # a digest that is not the request's family
        out = []
        for fam, kind in itertools.product([key.digest, other], ["snapshot", "session"]):
            for lcp in sorted({0, 1, key.length, max(0, key.length - 1), n, n // 2, int(rng.integers(0, n + 1))}):
                lcp = min(lcp, n)
                for extra in (0, 1, 100):
                    out.append(Candidate(fam, lcp, lcp + extra, kind))
        return out

    def test_reusable_is_between_0_and_lcp(self, detector):
        """A request may reuse at most the tokens it shares with the candidate (an int)."""
        rng = np.random.default_rng(4)
        for p in sample_prompts():
            key = detector.family(p)
            for c in self._candidates(p, key, rng):
                n = detector.reusable(p, key, c)
                assert isinstance(n, (int, np.integer)) and not isinstance(n, bool), f"reusable returned {n!r}"
                assert 0 <= n <= c.lcp, f"reusable returned {n} for {c} (lcp {c.lcp})"

    def test_sharing_more_tokens_never_gives_less(self, detector):
        """For one request and one cached sequence, a longer common prefix never allows
        less reuse (the longest match is preferred)."""
        for p in sample_prompts():
            key = detector.family(p)
            n = len(p.tokens)
            for fam, kind in itertools.product([key.digest, key.digest[::-1] + "0"], ["snapshot", "session"]):
                total = n + 5
                got = [detector.reusable(p, key, Candidate(fam, lcp, total, kind)) for lcp in range(0, n + 1)]
                assert all(a <= b for a, b in zip(got, got[1:])), \
                    f"{kind} of family {fam[:8]}: reuse decreases as the common prefix grows: {got}"

    def test_reusable_is_deterministic(self, detector):
        rng = np.random.default_rng(5)
        p = sample_prompts()[8]
        key = detector.family(p)
        cands = self._candidates(p, key, rng)
        first = [detector.reusable(p, key, c) for c in cands]
        assert [detector.reusable(p, key, c) for c in reversed(cands)] == first[::-1]

    def test_own_family_is_reused(self, detector):
        if not self.reuses_own_family:
            pytest.skip("reuses_own_family = False")
        toks = _tokens(6, 300)
        p = prompt(toks, 64)
        key = detector.family(p)
        n = key.length
        assert n > 0, "a 64-token family part gave no family prefix"
        snap = Candidate(key.digest, n, n, "snapshot")
        assert detector.reusable(p, key, snap) == n, "the request's own family snapshot is not reused"
        turn = Candidate(key.digest, 250, 280, "session")
        assert detector.reusable(p, key, turn) == 250, "a cached turn of the request's own family is not reused"

    def test_empty_and_short_prompts(self, detector):
        for p in (prompt([], 0), prompt([1], 0), prompt([1], 1), prompt([1, 2], 1)):
            key = detector.family(p)
            assert key.length <= len(p.tokens)
            for lcp in range(len(p.tokens) + 1):
                n = detector.reusable(p, key, Candidate(key.digest, lcp, lcp, "snapshot"))
                assert 0 <= n <= lcp

    # -- threads -----------------------------------------------------------------------------------------------
    def test_concurrent_calls_give_the_serial_results(self, detector):
        prompts = sample_prompts()
        rng = np.random.default_rng(7)
        work = [(p, detector.family(p)) for p in prompts]
        cands = [self._candidates(p, k, rng)[:40] for p, k in work]
        want = [(k, [detector.reusable(p, k, c) for c in cs]) for (p, k), cs in zip(work, cands)]
        problems: list[str] = []
        barrier = threading.Barrier(4)

        def run(t: int) -> None:
            try:
                barrier.wait(timeout=30)
                for r in range(3):
                    for j in range(len(prompts)):
                        i = (j * (t + 1) + r) % len(prompts)
                        p = prompts[i]
                        k = detector.family(p)
                        got = (k, [detector.reusable(p, k, c) for c in cands[i]])
                        if got != want[i]:
                            problems.append(f"thread {t}: prompt {i} differs")
            except BaseException as exc:  # noqa: BLE001 - reported below
                problems.append(f"thread {t}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not any(th.is_alive() for th in threads), "a thread hung"
        assert not problems, "\n".join(problems[:10])
