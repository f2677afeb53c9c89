"""Coverage-guided fuzzing (atheris) of the decoder and the matcher on hostile bytes.

Every input must decode to a Purchase and match without error, or raise DecodeError: anything
else is a crash the service would turn into a dead letter at best. Run by hand for longer:
    python tests/fuzz/fuzz_decode_match.py -runs=1000000 -max_len=4096
"""

from __future__ import annotations

import sys
import time

import atheris

with atheris.instrument_imports():
    from consumer.config import DecodingConfig, parse
    from consumer.decoding import DecodeError, encode_raw, load_schema, make_decoder
    from consumer.demo import sample_config
    from consumer.matcher import MatchSettings, match
    from consumer.samples import purchases

DECODER = make_decoder(DecodingConfig(max_message_bytes=64 * 1024))
SETTINGS = MatchSettings.from_config(parse(sample_config("x:1", "t", "d", "g", "http://sandbox"), env={}))
NOW = int(time.time() * 1000)


def one_input(data: bytes) -> None:
    try:
        purchase = DECODER.decode(data)
    except DecodeError:
        return
    decision = match(purchase, SETTINGS, NOW)
    keys = [c.key for c in decision.conversions]
    assert len(keys) == len(set(keys)), "two conversions with one key"


def seeds(directory: str) -> None:
    """Valid events to start from, so the fuzzer mutates real records rather than noise."""
    import pathlib

    schema = load_schema("schemas/purchase_completed.avsc")
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(purchases(20, now_ms=NOW, seed=5)):
        (out / f"seed-{i}").write_bytes(encode_raw(p, schema))


if __name__ == "__main__":
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    for d in corpus:
        seeds(d)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
