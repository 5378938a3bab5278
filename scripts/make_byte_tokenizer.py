"""Writes a byte-level tokenizer.json with exactly 256 tokens (one per byte, no merges) into a
fixture directory, so the experiment runner can be tested on the 256-token fixtures.

Usage: python3 scripts/make_byte_tokenizer.py tests/fixtures/models/glm4_moe-mlx4
Made with HF `tokenizers` (pip); the ids are the GPT-2 byte-to-unicode alphabet in byte order.
"""
import sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

alphabet = pre_tokenizers.ByteLevel.alphabet()
# Order the 256 symbols by the byte they stand for (GPT-2 byte-to-unicode map).
bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
cs = bs[:]
n = 0
for b in range(256):
    if b not in bs:
        bs.append(b)
        cs.append(256 + n)
        n += 1
byte_to_char = {b: chr(c) for b, c in zip(bs, cs)}
assert set(byte_to_char.values()) == set(alphabet)
vocab = {byte_to_char[b]: b for b in range(256)}
tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
tok.decoder = decoders.ByteLevel()
tok.save(f"{sys.argv[1]}/tokenizer.json")
assert tok.encode("hi").ids == [104, 105], tok.encode("hi").ids
print("wrote", f"{sys.argv[1]}/tokenizer.json")
