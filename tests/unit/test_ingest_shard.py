"""Ingest shards: the setting, the stable hash, and the symbol selection of one shard.

The hash must give a symbol the same shard in every process (Python salts ``hash()`` of strings per process),
and N shards must partition any symbol set: each symbol in exactly one shard.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.ingest.shard import Shard, shard_of
from services.ingest.symbols import SymbolRequestError, SymbolSelection, WrongShard
from services.shared.settings import ConfigError, load_settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SYMBOLS = sorted(
    {
        "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "TRXUSDT", "ADAUSDT", "LINKUSDT",
        "AVAXUSDT", "DOTUSDT", "LTCUSDT", "ATOMUSDT", "NEARUSDT", "APTUSDT", "ARBUSDT", "OPUSDT", "SUIUSDT",
        "1000PEPEUSDT", "ETHBTC",
    }
    | {f"{a}{b}{c}USDT" for a, b, c in itertools.product("ABCDEFGHIJ", "KLMNOPQRST", "UVWXYZ0123")}
)  # fmt: skip

# Known shards, written down: a change of the function (or of what it hashes) must fail here, since deployed
# processes would then follow other symbols than their topic history says.
KNOWN = {
    "BTCUSDT": (1, 1, 1),  # shards of 2, 3, 4
    "ETHUSDT": (0, 1, 2),
    "BNBUSDT": (0, 1, 0),
    "SOLUSDT": (1, 2, 1),
    "DOGEUSDT": (1, 0, 1),
}


def _sha_prefix(symbol: str) -> int:
    return int(hashlib.sha256(symbol.encode("ascii")).hexdigest()[:16], 16)


def test_the_hash_is_the_documented_one() -> None:
    """int(first 16 hex digits of sha256(symbol)) mod N: what ``printf BTCUSDT | sha256sum | cut -c1-16`` gives."""
    assert hex(_sha_prefix("BTCUSDT")) == "0x19aa16aed07f38e9"
    for symbol in ("BTCUSDT", "ETHUSDT", "1000PEPEUSDT", "X"):
        for count in (1, 2, 3, 7, 1024):
            assert shard_of(symbol, count) == _sha_prefix(symbol) % count
    assert {s: tuple(shard_of(s, n) for n in (2, 3, 4)) for s in KNOWN} == KNOWN
    assert shard_of("btcusdt", 5) == shard_of("BTCUSDT", 5), "symbols are upper-case, whatever the input"
    with pytest.raises(ValueError, match="count must be >= 1"):
        shard_of("BTCUSDT", 0)


def test_a_symbols_shard_is_the_same_in_every_process() -> None:
    """Other processes, other string-hash seeds (and no shared state): the same shard for every symbol."""
    here = {count: [shard_of(s, count) for s in SYMBOLS] for count in (2, 3, 8)}
    script = (
        "import json, sys; from services.ingest.shard import shard_of; symbols = json.load(sys.stdin); "
        "print(json.dumps({n: [shard_of(s, n) for s in symbols] for n in (2, 3, 8)}))"
    )
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps(SYMBOLS),
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            check=True,
            timeout=60,
        ).stdout
        assert {int(k): v for k, v in json.loads(out).items()} == here, f"PYTHONHASHSEED={seed}"


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 16])
def test_n_shards_partition_the_set(count: int) -> None:
    """Every symbol in exactly one of the N shards; their union is the whole set; no shard is starved."""
    shards = [Shard(i, count) for i in range(count)]
    parts = [shard.own(SYMBOLS) for shard in shards]
    assert set().union(*parts) == set(SYMBOLS)
    assert sum(len(p) for p in parts) == len(SYMBOLS), "a symbol in two shards"
    for symbol in SYMBOLS:
        assert [shard.owns(symbol) for shard in shards].count(True) == 1
        assert Shard(0, count).owner(symbol).owns(symbol)
    fair = len(SYMBOLS) / count
    assert all(0.8 * fair <= len(p) <= 1.2 * fair for p in parts), [len(p) for p in parts]


def test_one_shard_follows_everything() -> None:
    assert Shard().whole and str(Shard()) == "0/1"
    assert Shard().own(SYMBOLS) == set(SYMBOLS)
    with pytest.raises(ValueError, match="0 <= i < N"):
        Shard(2, 2)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("3/2", "index i must be below the count N"),
        ("2/2", "index i must be below the count N"),
        ("0/0", "count N must be between 1 and 1024"),
        ("0/2000", "count N must be between 1 and 1024"),
        ("a/b", 'expected "i/N"'),
        ("-1/2", 'expected "i/N"'),
        ("1", 'expected "i/N"'),
        ("1/2/3", 'expected "i/N"'),
        ("", 'expected "i/N"'),
    ],
)
def test_a_bad_shard_setting_names_the_key(value: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLINES_INGEST__SHARD", value)
    with pytest.raises(ConfigError) as info:
        load_settings(REPO / "config" / "klines.toml")
    text = str(info.value)
    assert text.startswith("invalid configuration: ingest.shard = ")
    assert "environment variable KLINES_INGEST__SHARD" in text and message in text


def test_shard_setting_from_file_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert load_settings(REPO / "config" / "klines.toml").ingest.shard == "0/1"
    monkeypatch.setenv("KLINES_INGEST__SHARD", " 1 / 3 ")
    settings = load_settings(REPO / "config" / "klines.toml")
    assert (settings.ingest.shard, settings.ingest.shard_index, settings.ingest.shard_count) == ("1/3", 1, 3)
    monkeypatch.delenv("KLINES_INGEST__SHARD")
    config = tmp_path / "klines.toml"
    config.write_text('[ingest]\nshard = "5/4"\n')
    with pytest.raises(ConfigError, match=rf"ingest.shard = '5/4' \(config file {config}\)"):
        load_settings(config)


def _split(count: int) -> tuple[list[str], list[str]]:
    """Two of the test symbols in shard 0 of ``count`` and two in shard 1."""
    zero = [s for s in SYMBOLS if shard_of(s, count) == 0][:2]
    one = [s for s in SYMBOLS if shard_of(s, count) == 1][:2]
    return zero, one


def test_selection_keeps_its_shards_part_of_the_base_set() -> None:
    selection = SymbolSelection(base=set(SYMBOLS), shard=Shard(1, 3))
    assert selection.wanted == {s for s in SYMBOLS if shard_of(s, 3) == 1}
    assert selection.elsewhere == len(SYMBOLS) - len(selection.wanted)
    selection.set_base(["BTCUSDT", "ETHUSDT", "SOLUSDT"])  # a discovery refresh: the whole set again
    assert selection.wanted == {s for s in ("BTCUSDT", "ETHUSDT", "SOLUSDT") if shard_of(s, 3) == 1}


def test_post_symbols_of_another_shard_is_refused_with_its_owner() -> None:
    zero, one = _split(2)
    selection = SymbolSelection(base={zero[0]}, shard=Shard(0, 2))
    with pytest.raises(WrongShard) as info:
        selection.apply({"add": [zero[1], one[0].lower()]})
    assert info.value.owners == {one[0]: Shard(1, 2)}
    assert f"{one[0]} -> shard 1/2" in str(info.value) and "this ingest is shard 0/2" in str(info.value)
    assert isinstance(info.value, SymbolRequestError)
    assert selection.wanted == {zero[0]}, "nothing applied"
    with pytest.raises(WrongShard):
        selection.apply({"remove": [one[1]]})
    selection.apply({"add": [zero[1]]})
    assert selection.wanted == set(zero)
    # The whole set, as in the config: this shard keeps its part, the rest is left to the other shard.
    selection.apply({"symbols": zero + one})
    assert selection.wanted == set(zero) and selection.elsewhere == 2
    selection.apply({"remove": [zero[0]]})
    assert selection.wanted == {zero[1]}
