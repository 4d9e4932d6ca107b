"""Tokenizers: padding, mask, empty caption, truncation, round trip, GPT-2 BPE on tiny files."""
import gzip
import json
import re

import numpy as np
import pytest

from glide_jax.data import tokenizers

CAPTIONS = ["a small red circle on the left", "a blue square, large, at the top",
            "in the center: a large green triangle", "at the bottom: a small cyan square",
            "a purple circle, small, on the right", "a large yellow triangle in the center"] * 20


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  path = tmp_path_factory.mktemp("sp") / "tok.model"
  return tokenizers.train_sentencepiece(CAPTIONS, 48, path)


def test_sentencepiece_padding_mask_empty_truncation(sp_model):
  tok = tokenizers.load_tokenizer({"type": "sentencepiece", "files": {"model": sp_model}, "text_ctx": 32})
  assert tok.pad_id == 0 and tok.text_ctx == 32 and 10 < tok.vocab_size <= 48
  long = "a small red circle on the left and a large blue square at the top " * 3
  tokens, mask = tok.encode_batch(["a small red circle on the left", "", long])
  assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == (3, 32) == mask.shape
  n = int(mask[0].sum())
  assert 0 < n < 32
  assert mask[0, :n].all() and not mask[0, n:].any()  # right-padded
  assert (tokens[0, n:] == tok.pad_id).all() and (tokens[0, :n] != tok.pad_id).all()
  # The empty caption is all padding with an all-false mask: exactly empty(1).
  e_tok, e_mask = tok.empty(1)
  np.testing.assert_array_equal(tokens[1:2], e_tok)
  np.testing.assert_array_equal(mask[1:2], e_mask)
  assert not e_mask.any() and (e_tok == tok.pad_id).all()
  # Over-long captions are cut to text_ctx and counted.
  assert mask[2].all() and tok.truncated == 1
  tok.encode_batch([long, long, "a red circle"])
  assert tok.truncated == 3
  # Round trip.
  assert tok.decode(tokens[0]) == "a small red circle on the left"
  assert tok.decode(tokens[2]) == " ".join(long.split())[:len(tok.decode(tokens[2]))]


def test_spec_round_trip_and_errors(sp_model, tmp_path):
  tok = tokenizers.load_tokenizer({"type": "sentencepiece", "path": sp_model, "text_ctx": 9})
  again = tokenizers.load_tokenizer(tok.spec())
  a = tok.encode_batch(CAPTIONS[:4])
  b = again.encode_batch(CAPTIONS[:4])
  np.testing.assert_array_equal(a[0], b[0])
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tokenizers.load_tokenizer({"type": "sentencepiece", "path": str(tmp_path / "missing.model")})
  with pytest.raises(ValueError, match="unknown tokenizer type"):
    tokenizers.load_tokenizer({"type": "nope"})
  with pytest.raises(ValueError, match="encoder.json"):
    tokenizers.load_tokenizer({"type": "gpt2", "path": ""})
  with pytest.raises(ValueError, match="no non-empty captions"):
    tokenizers.train_sentencepiece(["", "  "], 10, tmp_path / "x.model")


def test_words_tokenizer():
  tok = tokenizers.load_tokenizer({"type": "words", "path": "", "text_ctx": 10})
  tokens, mask = tok.encode_batch(["At the top: a small RED circle", "a purple blob", ""])
  assert tok.decode(tokens[0]) == "at the top: a small red circle"
  assert mask[0].sum() == 8 and mask[1].sum() == 3 and not mask[2].any()
  assert tokens[1, 2] == 1  # unknown word
  assert tok.spec() == {"type": "words", "files": {}, "text_ctx": 10}


# ---------------------------------------------------------------------- GPT-2 BPE on tiny files

def bytes_to_unicode():
  """GPT-2's reversible byte -> printable character table (from the GPT-2 paper's code's rule)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
      list(range(ord("\xae"), ord("\xff") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


MERGES = [("Ġ", "h"), ("h", "e"), ("l", "l"), ("Ġh", "e"), ("he", "ll"), ("Ġhe", "ll"), ("hell", "o"),
          ("Ġhell", "o"), ("e", "d"), ("Ġ", "r"), ("Ġr", "ed"), ("'", "s"), ("Ġ", "c"), ("i", "r"),
          ("Ġc", "ir"), ("1", "2")]


def reference_bpe_encode(text, encoder, ranks, byte_enc):
  """A plain implementation of GPT-2 BPE (lower-cased, as GLIDE), for ASCII text."""
  pat = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")
  ids = []
  for piece in pat.findall(text.lower()):
    word = [byte_enc[b] for b in piece.encode("utf-8")]
    while len(word) > 1:
      pairs = [(ranks.get((word[i], word[i + 1]), 1e9), i) for i in range(len(word) - 1)]
      best = min(pairs)[0]
      if best == 1e9:
        break
      pair = next((word[i], word[i + 1]) for r, i in pairs if r == best)
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    ids.extend(encoder[w] for w in word)
  return ids


@pytest.fixture
def tiny_gpt2(tmp_path):
  byte_enc = bytes_to_unicode()
  vocab = [byte_enc[b] for b in range(256)] + ["".join(m) for m in MERGES] + ["<|endoftext|>"]
  encoder = {s: i for i, s in enumerate(vocab)}
  (tmp_path / "encoder.json").write_text(json.dumps(encoder))
  (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n")
  return tmp_path, encoder, {m: i for i, m in enumerate(MERGES)}, byte_enc


TEXTS = ["Hello hello", "a red  circle, on the LEFT!", "it's 12 o'clock", "  spaces  ", "", "hello\nworld",
         "HeLLo red circ"]


def test_gpt2_bpe_matches_reference_on_tiny_files(tiny_gpt2):
  d, encoder, ranks, byte_enc = tiny_gpt2
  tok = tokenizers.load_tokenizer({"type": "gpt2_bpe", "files": {"encoder.json": str(d / "encoder.json"),
                                                                 "vocab.bpe": str(d / "vocab.bpe")},
                                   "text_ctx": 24})
  n_vocab = 256 + len(MERGES) + 1
  assert tok.vocab_size == n_vocab and tok.pad_id == n_vocab - 1  # end token pads, as in GLIDE
  tokens, mask = tok.encode_batch(TEXTS)
  for row, text in enumerate(TEXTS):
    want = reference_bpe_encode(text, encoder, ranks, byte_enc)[:24]
    got = tokens[row, :mask[row].sum()].tolist()
    assert got == want, (text, got, want)
    assert (tokens[row, len(want):] == tok.pad_id).all() and mask[row].sum() == len(want)
  # Merges really happen (not byte-by-byte), lower-casing included.
  assert tokens[0, :2].tolist() == [encoder["hello"], encoder["Ġhello"]]
  assert tok.decode(tokens[0, :mask[0].sum()]) == "hello hello"
  assert not mask[4].any() and (tokens[4] == tok.pad_id).all()
  # Truncation: 30 pieces into a context of 24.
  _, m2 = tok.encode_batch(["hello " * 30])
  assert m2.all() and tok.truncated == 1


def test_gpt2_bpe_gz_files_and_directory(tiny_gpt2):
  d, encoder, ranks, byte_enc = tiny_gpt2
  gz = d / "gz"
  gz.mkdir()
  for name in ("encoder.json", "vocab.bpe"):
    (gz / f"{name}.gz").write_bytes(gzip.compress((d / name).read_bytes()))
  tok = tokenizers.load_tokenizer({"type": "gpt2", "path": str(gz), "text_ctx": 16})
  tokens, mask = tok.encode_batch(["Hello red circle"])
  assert tokens[0, :mask[0].sum()].tolist() == reference_bpe_encode("Hello red circle", encoder, ranks, byte_enc)
  assert tokenizers.load_tokenizer(tok.spec()).encode_batch(["Hello"])[0].tolist() == \
      tok.encode_batch(["Hello"])[0].tolist()


CLIP_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o</w>"), ("r", "e"), ("re", "d</w>"),
               ("c", "i"), ("ci", "r"), ("cir", "cle</w>"), ("c", "le</w>"), ("l", "e</w>")]


def reference_clip_encode(text, vocab, ranks, byte_enc, ctx):
  """CLIP's BPE written out plainly (ASCII text): end-of-word suffix, SOT/EOT, zero padding."""
  text = re.sub(r"\s+", " ", text).strip().lower()
  ids = []
  for piece in re.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+", text):
    chars = [byte_enc[b] for b in piece.encode()]
    word = chars[:-1] + [chars[-1] + "</w>"]
    while len(word) > 1:
      pairs = [(ranks.get((word[i], word[i + 1]), 1e9), i) for i in range(len(word) - 1)]
      r, i = min(pairs)
      if r == 1e9:
        break
      word = word[:i] + [word[i] + word[i + 1]] + word[i + 2:]
    ids.extend(vocab[w] for w in word)
  seq = [vocab["<|startoftext|>"]] + ids[:ctx - 2] + [vocab["<|endoftext|>"]]
  return seq + [0] * (ctx - len(seq)), len(seq)


def test_clip_bpe_on_tiny_file(tmp_path):
  byte_enc = bytes_to_unicode()
  symbols = list(byte_enc.values())
  vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in CLIP_MERGES]
  vocab_list += ["<|startoftext|>", "<|endoftext|>"]
  vocab = {v: i for i, v in enumerate(vocab_list)}
  path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
  path.write_bytes(gzip.compress(("\"bpe_simple_vocab_16e6.txt#version: 0.2\n"
                                  + "\n".join(" ".join(m) for m in CLIP_MERGES)).encode()))
  tok = tokenizers.load_tokenizer({"type": "clip", "path": str(tmp_path), "text_ctx": 10})
  assert tok.vocab_size == len(vocab_list) and tok.pad_id == 0
  ranks = {m: i for i, m in enumerate(CLIP_MERGES)}
  texts = ["Hello red circle", "hello,  HELLO!", "", "it's a red red red red red red red red"]
  tokens, mask = tok.encode_batch(texts)
  for row, text in enumerate(texts):
    want, length = reference_clip_encode(text, vocab, ranks, byte_enc, 10)
    assert tokens[row].tolist() == want, text
    assert mask[row].sum() == length and mask[row, :length].all()
  assert tokens[0, 1:3].tolist() == [vocab["hello</w>"], vocab["red</w>"]]
  assert mask[2].sum() == 2  # the empty caption is [SOT, EOT], as in GLIDE's CLIP
  assert tok.truncated == 1
  assert tok.decode(tokens[0]) == "hello red circle"


def _tiny_clip(tmp_path, ctx=8):
  path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
  path.write_bytes(gzip.compress(("\"bpe_simple_vocab_16e6.txt#version: 0.2\n"
                                  + "\n".join(" ".join(m) for m in CLIP_MERGES)).encode()))
  return tokenizers.load_tokenizer({"type": "clip", "path": str(tmp_path), "text_ctx": ctx})


def test_clip_bpe_cleans_text_and_maps_special_tokens_as_the_reference(tmp_path):
  # Ids of the tiny vocabulary, counted by hand: byte symbols 0-255 in GPT-2's table order ('!' = 0,
  # ..., '~' = 93, then 0xa1-0xac, 0xae-0xff, then the 68 other bytes), the same with </w> at +256,
  # the 11 merges from 512 (red</w> = 517, circle</w> = 520), SOT 523, EOT 524.
  tok = _tiny_clip(tmp_path)
  sot, eot, red, circle = 523, 524, 517, 520
  quote, amp = 256 + ord('"') - 33, 256 + ord("&") - 33
  cases = {
      # ftfy uncurls quotes: the curly-quote caption tokenizes like the straight-quote one
      "\u201cred\u201d circle": [quote, red, quote, circle],
      '"red" circle': [quote, red, quote, circle],
      # ftfy composes "e" + U+0301 into "\u00e9" (bytes c3 a9 = symbols 127 and 102 + 256)
      "cafe\u0301": [ord("c") - 33, ord("a") - 33, ord("f") - 33, 127, 256 + 102],
      # html entities unescaped twice, whitespace collapsed, lower-cased
      "RED &amp;amp;\t\n circle": [red, amp, circle],
      # a literal special token is the special token (lower-casing first), not its characters
      "red <|endoftext|>": [red, eot],
      "<|startoftext|>red <|EndOfText|>circle": [sot, red, eot, circle],
      # after punctuation the reference's regex takes ".<|" as one piece, so no special token
      # (then "endoftext" letter by letter, cut at the context)
      "red.<|endoftext|>": [red, ord(".") - 33, ord("<") - 33, 256 + ord("|") - 33, ord("e") - 33, ord("n") - 33],
  }
  tokens, mask = tok.encode_batch(list(cases))
  for row, (text, body) in enumerate(cases.items()):
    want = [sot] + body[:6] + [eot]
    assert tokens[row].tolist() == want + [0] * (8 - len(want)), text
    assert mask[row].sum() == len(want)


def test_clip_bpe_refuses_to_run_without_ftfy(tmp_path, monkeypatch):
  # The reference always runs ftfy.fix_text; skipping it silently would change the tokens.
  monkeypatch.setitem(__import__("sys").modules, "ftfy", None)
  with pytest.raises(ImportError):
    _tiny_clip(tmp_path)


def test_train_tokenizer_cli(tmp_path):
  from glide_jax import cli
  data_dir = str(tmp_path / "tfds")
  assert cli.main(["data", "prepare", "--name", "glide_shapes/size32", "--data-dir", data_dir,
                   "--train-examples", "150", "--validation-examples", "10"]) == 0
  out = tmp_path / "shapes.model"
  assert cli.main(["data", "train-tokenizer", "--dataset", "glide_shapes/size32", "--data-dir", data_dir,
                   "--vocab-size", "40", "--out", str(out)]) == 0
  tok = tokenizers.load_tokenizer({"type": "sentencepiece", "path": str(out), "text_ctx": 64})
  tokens, mask = tok.encode_batch(["at the top: a large blue square"])
  assert tok.decode(tokens[0]) == "at the top: a large blue square"
  assert tokenizers.UNK_ID not in tokens[0, :mask[0].sum()]
  assert cli.main(["data", "train-tokenizer", "--dataset", "glide_shapes/size32", "--data-dir", data_dir,
                   "--vocab-size", "40", "--out", str(out), "--caption-key", "nope"]) == 2
