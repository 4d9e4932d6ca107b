"""Tokenizers: captions -> (tokens [B, L] int32, mask [B, L] bool, True = real token).

Four kinds, one interface (`encode_batch`, `empty`, `text_ctx`, `vocab_size`, `pad_id`,
`truncated`, `spec()`):
  - `SentencePieceTokenizer`: a model trained on a dataset's captions (`train_sentencepiece`).
  - `GPT2BPETokenizer`: GLIDE's GPT-2 byte-level BPE, from glide-text2im's `encoder.json` and
    `vocab.bpe` (optionally .gz), run by the `tokenizers` library. Like GLIDE's `bpe.py` it
    lower-cases, adds no start/end token and right-pads with the end token (n_vocab - 1).
  - `ClipBPETokenizer`: the noised CLIP's tokenizer (CLIP's BPE with SOT/EOT, zero-padded).
  - `WordTokenizer`: a fixed word list (by default glide_shapes' closed vocabulary), for tiny runs.
Tokens are right-padded to `text_ctx`; longer captions are truncated and counted in `truncated`.
The empty caption is all padding with an all-false mask (except for `clip`, see its class):
`empty(n)` is exactly that, the form the trainer uses for caption dropout and the sampler for the
unconditional branch.

No TensorFlow here: the sampler imports this module.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_TEXT_CTX = 128
UNK_ID = 1  # of sentencepiece models trained here (pad 0, unk 1)


class Tokenizer:
  """Shared padding, truncation counting and the empty caption."""

  kind: str = ""

  def __init__(self, text_ctx: int, vocab_size: int, pad_id: int):
    if text_ctx <= 0:
      raise ValueError(f"text_ctx must be positive, got {text_ctx}")
    self.text_ctx = int(text_ctx)
    self.vocab_size = int(vocab_size)
    self.pad_id = int(pad_id)
    self.truncated = 0  # captions cut to text_ctx so far
    self._lock = threading.Lock()  # tf.data may call encode_batch from several threads

  def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """texts: B strings -> tokens [B, text_ctx] int32 (right-padded with pad_id), mask [B, text_ctx]."""
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    ids = self.encode_ids(texts)
    tokens, mask = self.empty(len(texts))
    cut = 0
    for row, seq in enumerate(ids):
      if len(seq) > self.text_ctx:
        seq, cut = seq[:self.text_ctx], cut + 1
      tokens[row, :len(seq)] = seq
      mask[row, :len(seq)] = True
    with self._lock:
      self.truncated += cut
    return tokens, mask

  def empty(self, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The unconditional caption for n rows: tokens all pad_id [n, L] int32, mask all False [n, L]."""
    return (np.full((n, self.text_ctx), self.pad_id, np.int32), np.zeros((n, self.text_ctx), bool))

  def spec(self) -> dict[str, Any]:
    """The dict `load_tokenizer` rebuilds this tokenizer from (bundles store it)."""
    raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model; padding uses the model's pad id (0 for models from this module)."""

  kind = "sentencepiece"

  def __init__(self, model_file: str | os.PathLike, text_ctx: int = DEFAULT_TEXT_CTX):
    import sentencepiece as spm

    model_file = os.fspath(model_file)
    if not os.path.isfile(model_file):
      raise FileNotFoundError(f"sentencepiece model {model_file} does not exist")
    self.model_file = model_file
    self._sp = spm.SentencePieceProcessor(model_file=model_file)
    pad = self._sp.pad_id()
    if pad < 0:
      raise ValueError(f"sentencepiece model {model_file} has no pad token; train it with "
                       "`glide-jax data train-tokenizer` (pad id 0)")
    super().__init__(text_ctx, self._sp.get_piece_size(), pad)

  def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids if int(i) != self.pad_id])

  def spec(self) -> dict[str, Any]:
    return {"type": self.kind, "files": {"model": self.model_file}, "text_ctx": self.text_ctx}


def _read_maybe_gz(path: str | os.PathLike) -> bytes:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file {path} does not exist")
  with open(path, "rb") as f:
    data = f.read()
  return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


class GPT2BPETokenizer(Tokenizer):
  """GLIDE's tokenizer: GPT-2 byte-level BPE, lower-cased, padded with the end token."""

  kind = "gpt2_bpe"

  def __init__(self, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike,
               text_ctx: int = DEFAULT_TEXT_CTX):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    self.files = {"encoder.json": os.fspath(encoder_json), "vocab.bpe": os.fspath(vocab_bpe)}
    try:
      vocab = json.loads(_read_maybe_gz(encoder_json).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{encoder_json} is not a GPT-2 encoder.json: {e}") from None
    merges = []
    for n, line in enumerate(_read_maybe_gz(vocab_bpe).decode("utf-8").split("\n")):
      if n == 0 and line.startswith("#version"):
        continue  # GPT-2's vocab.bpe starts with a version line; bpe.py skips it too
      if not line.strip():
        continue
      parts = line.split()
      if len(parts) != 2:
        raise ValueError(f"{vocab_bpe}:{n + 1}: expected two symbols per merge, got {line!r}")
      merges.append((parts[0], parts[1]))
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
    self._tok = HFTokenizer(bpe)
    # GPT-2's pre-tokenizer regex and byte-to-unicode table; no prefix space, like bpe.py.
    self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    self._tok.decoder = decoders.ByteLevel()
    n_vocab = len(vocab)
    super().__init__(text_ctx, n_vocab, n_vocab - 1)  # bpe.py: end_token = n_vocab - 1

  def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
    # Python's str.lower, as in bpe.py (not the library's Unicode normalizer).
    encodings = self._tok.encode_batch([t.lower() for t in texts], add_special_tokens=False)
    return [e.ids for e in encodings]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def spec(self) -> dict[str, Any]:
    return {"type": self.kind, "files": dict(self.files), "text_ctx": self.text_ctx}


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable character table, in its own order."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1)))
  cs = bs[:]
  extra = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + extra)
      extra += 1
  return dict(zip(bs, (chr(c) for c in cs)))


class ClipBPETokenizer(Tokenizer):
  """The noised CLIP's tokenizer (CLIP's `simple_tokenizer`, as glide-text2im uses it).

  From `bpe_simple_vocab_16e6.txt.gz` (given by the user): vocab = 256 byte symbols, the same with
  `</w>`, the merges, `<|startoftext|>`, `<|endoftext|>` (49,408 for the real file). Text is
  cleaned as the reference's `basic_clean` and `whitespace_clean` (ftfy's fix_text, HTML-unescaped
  twice, whitespace collapsed) and lower-cased, split with CLIP's regex and BPE-merged with the
  end-of-word suffix `</w>`; a piece that is literally `<|startoftext|>` or `<|endoftext|>` is that
  special token, as in the reference. A caption becomes
  `[SOT] + tokens[:text_ctx - 2] + [EOT]`, zero-padded (GLIDE: text_ctx 77, `text_len` = the mask's
  sum, counting SOT and EOT); the empty caption is [SOT, EOT] here, while `empty(n)` stays all
  padding, as for every tokenizer.
  """

  kind = "clip"
  _PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
              r"|[^\s\p{L}\p{N}]+")

  def __init__(self, bpe_file: str | os.PathLike, text_ctx: int = 77):
    import ftfy  # a dependency: the reference always fixes text with it
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    self._fix_text = ftfy.fix_text

    self.bpe_file = os.fspath(bpe_file)
    lines = _read_maybe_gz(self.bpe_file).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1] if m.strip()]
    for n, m in enumerate(merges):
      if len(m) != 2:
        raise ValueError(f"{self.bpe_file}:{n + 2}: expected two symbols per merge, got {' '.join(m)!r}")
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [v + "</w>" for v in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {v: i for i, v in enumerate(vocab_list)}
    self.sot, self.eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", fuse_unk=False)
    self._specials = {"<|startoftext|>": self.sot, "<|endoftext|>": self.eot}
    self._tok = HFTokenizer(bpe)
    self._split = pre_tokenizers.Split(Regex(self._PATTERN), behavior="removed", invert=True)
    self._tok.pre_tokenizer = pre_tokenizers.Sequence([
        self._split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    self._tok.decoder = decoders.BPEDecoder(suffix="</w>")
    self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    if text_ctx < 2:
      raise ValueError(f"the clip tokenizer needs text_ctx >= 2, got {text_ctx}")
    super().__init__(text_ctx, len(vocab_list), 0)  # GLIDE zero-pads CLIP tokens

  def _clean(self, text: str) -> str:
    import html
    import re
    text = html.unescape(html.unescape(self._fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()

  def _encode_with_specials(self, text: str) -> list[int]:
    """Pieces that are literally a special token become its id; the text between them is encoded
    as usual (the regex restarts at a piece boundary, so its pieces are those of the whole text)."""
    ids, start = [], 0
    for piece, (a, b) in self._split.pre_tokenize_str(text):
      if piece in self._specials:
        if a > start:
          ids += self._tok.encode(text[start:a], add_special_tokens=False).ids
        ids.append(self._specials[piece])
        start = b
    if start < len(text):
      ids += self._tok.encode(text[start:], add_special_tokens=False).ids
    return ids

  def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
    texts = [self._clean(t) for t in texts]
    encoded = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
    encoded = [self._encode_with_specials(t) if "<|" in t else e for t, e in zip(texts, encoded)]
    keep = self.text_ctx - 2
    cut = sum(len(e) > keep for e in encoded)
    with self._lock:
      self.truncated += cut
    return [[self.sot] + e[:keep] + [self.eot] for e in encoded]

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    ids = ids[:ids.index(self.eot)] if self.eot in ids else ids  # padding (0) follows EOT
    words = [self._tok.id_to_token(i) for i in ids if i != self.sot]
    text = "".join(w for w in words if w is not None)
    raw = bytearray(self._byte_decoder.get(c, 32) for c in text.replace("</w>", " "))
    return raw.decode("utf-8", "replace").replace("</w>", " ").strip()

  def spec(self) -> dict[str, Any]:
    return {"type": self.kind, "files": {"bpe": self.bpe_file}, "text_ctx": self.text_ctx}


def shapes_words() -> list[str]:
  """The closed vocabulary of glide_shapes captions (sorted), for the built-in `words` tokenizer."""
  from glide_jax.data import render

  words = {"a", ",", ":"}
  for names in (render.COLOURS, render.SHAPES, render.SIZES, render.WHERE):
    for name in names:
      words.update(name.split())
  return sorted(words)


class WordTokenizer(Tokenizer):
  """Word-level tokens from a fixed list: 0 = pad, 1 = unk, then the words in order.

  Text is lower-cased and split into runs of letters/digits and single other characters. With
  no vocabulary file it uses the glide_shapes vocabulary (`shapes_words`).
  """

  kind = "words"

  def __init__(self, vocab_file: str | os.PathLike | None = None, text_ctx: int = DEFAULT_TEXT_CTX):
    import re

    self.vocab_file = os.fspath(vocab_file) if vocab_file else None
    if self.vocab_file:
      words = [w.strip() for w in _read_maybe_gz(self.vocab_file).decode("utf-8").splitlines() if w.strip()]
    else:
      words = shapes_words()
    self.words = ["<pad>", "<unk>"] + [w for w in words if w not in ("<pad>", "<unk>")]
    self._ids = {w: i for i, w in enumerate(self.words)}
    self._split = re.compile(r"[^\W_]+|[^\w\s]|_")
    super().__init__(text_ctx, len(self.words), 0)

  def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
    return [[self._ids.get(w, 1) for w in self._split.findall(t.lower())] for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    out = ""
    for i in ids:
      if int(i) == self.pad_id:
        continue
      w = self.words[int(i)] if 0 <= int(i) < len(self.words) else "<unk>"
      out += w if (not out or not w[0].isalnum()) else " " + w
    return out

  def spec(self) -> dict[str, Any]:
    files = {"vocab": self.vocab_file} if self.vocab_file else {}
    return {"type": self.kind, "files": files, "text_ctx": self.text_ctx}


def load_tokenizer(spec: Mapping[str, Any]) -> Tokenizer:
  """Builds a tokenizer from a dict (a bundle's meta['tokenizer'] or the config's data.tokenizer).

  {"type": "sentencepiece", "files": {"model": path}, "text_ctx": 128} or
  {"type": "gpt2_bpe", "files": {"encoder.json": p, "vocab.bpe": p}, "text_ctx": 128} ("gpt2" too);
  {"type": "words", "files": {"vocab": p} or {}, "text_ctx": 16} (no file: the shapes words);
  instead of "files", "path" may name the model file (sentencepiece) or a directory holding
  encoder.json(.gz) and vocab.bpe(.gz) (gpt2_bpe).
  """
  spec = dict(spec)
  kind = spec.get("type")
  text_ctx = int(spec.get("text_ctx") or DEFAULT_TEXT_CTX)
  files = dict(spec.get("files") or {})
  path = spec.get("path")
  if kind == "sentencepiece":
    model = files.get("model") or path
    if not model:
      raise ValueError("sentencepiece tokenizer spec needs files.model or path")
    return SentencePieceTokenizer(model, text_ctx)
  if kind == "clip":
    bpe = files.get("bpe") or path
    if not bpe:
      raise ValueError("the clip tokenizer needs CLIP's bpe_simple_vocab_16e6.txt.gz (from glide-text2im): "
                       "set data.tokenizer.path to it (nothing is downloaded)")
    if os.path.isdir(bpe):
      bpe = os.path.join(bpe, "bpe_simple_vocab_16e6.txt.gz")
    return ClipBPETokenizer(bpe, int(spec.get("text_ctx") or 77))
  if kind == "words":
    return WordTokenizer(files.get("vocab") or path or None, text_ctx)
  if kind in ("gpt2_bpe", "gpt2"):
    if not path and not files:
      raise ValueError("the gpt2 tokenizer needs glide-text2im's encoder.json and vocab.bpe (or .gz): "
                       "set data.tokenizer.path to the directory holding them (nothing is downloaded)")
    if path and not files:
      for name in ("encoder.json", "vocab.bpe"):
        for candidate in (name, name + ".gz"):
          if os.path.isfile(os.path.join(path, candidate)):
            files[name] = os.path.join(path, candidate)
    missing = [n for n in ("encoder.json", "vocab.bpe") if not files.get(n)]
    if missing:
      raise ValueError(f"gpt2_bpe tokenizer spec is missing files {missing} (spec: {spec})")
    return GPT2BPETokenizer(files["encoder.json"], files["vocab.bpe"], text_ctx)
  raise ValueError(f"unknown tokenizer type {kind!r}; expected 'sentencepiece', 'gpt2_bpe' (or 'gpt2'), "
                   "'clip' or 'words'")


def train_sentencepiece(captions: Iterable[str], vocab_size: int, out: str | os.PathLike,
                        model_type: str = "unigram", character_coverage: float = 1.0) -> str:
  """Trains a sentencepiece model on captions and writes it to `out` (a .model file).

  Ids: 0 = pad, 1 = unk, no bos/eos (GLIDE's text encoder adds none either). If the captions
  cannot support `vocab_size` pieces the model gets fewer (hard_vocab_limit off).
  """
  import sentencepiece as spm

  captions = [c for c in captions if c and c.strip()]
  if not captions:
    raise ValueError("no non-empty captions to train a tokenizer on")
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(captions), model_writer=buf, vocab_size=int(vocab_size),
      model_type=model_type, character_coverage=character_coverage, pad_id=0, unk_id=UNK_ID,
      bos_id=-1, eos_id=-1, hard_vocab_limit=False, input_sentence_size=2_000_000,
      shuffle_input_sentence=True, minloglevel=2)
  out = os.fspath(out)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + ".tmp"
  with open(tmp, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, out)
  return out
