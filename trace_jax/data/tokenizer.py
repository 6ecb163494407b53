"""Text tokenizers for trace_jax behind one small `Tokenizer` protocol.

`HFTokenizer` wraps a Hugging Face `tokenizer.json` (the Qwen2.5-VL one in practice) and adds the
`<|emb|>` special token whose last hidden state becomes the embedding. `SentencePieceTokenizer`
trains and wraps a small SentencePiece model for toy runs and tests. This module does not build
chat prompts, insert image tokens or batch and pad sequences.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2

EMB_TOKEN = "<|emb|>"
# End-of-reasoning marker, written between the reasoning and the answer when
# `data.reasoning_marker` is on (the paper's `</think>` readout ablation).
EOR_TOKEN = "</think>"

_TOKENIZER_FILE = "tokenizer.json"
# A SentencePiece tokenizer's file in a model directory (`SentencePieceTokenizer.save`).
SENTENCEPIECE_FILE = "sentencepiece.model"
_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


@runtime_checkable
class Tokenizer(Protocol):
  """What trace_jax needs from a tokenizer: ids in, text out, and the `<|emb|>` id."""

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; no BOS/EOS or other special tokens are added."""
    ...

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`."""
    ...

  def token_to_id(self, token: str) -> int:
    """Id of `token`; raises KeyError naming the token if it is not in the vocabulary."""
    ...

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included."""
    ...

  @property
  def emb_id(self) -> int:
    """Id of `EMB_TOKEN`."""
    ...


class HFTokenizer:
  """A Hugging Face `tokenizers.Tokenizer` with `<|emb|>` (and any `extra_special` tokens, e.g.
  `EOR_TOKEN`) added as special tokens.

  Attributes:
    num_base_tokens: vocab size (added tokens included) before this wrapper added any.
    added_ids: ids this wrapper added; empty when the tokenizer already had them all.
    special: the tokens it guarantees: `<|emb|>`, then `extra_special`.
    source_dir: directory the tokenizer was read from, if any; `save` copies its
      `tokenizer_config.json`.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, source_dir: str | None = None,
               extra_special: Sequence[str] = ()):
    """Wraps `tokenizer`, adding each of `EMB_TOKEN` and `extra_special` to it in place when it
    is missing."""
    self._tok = tokenizer
    self.source_dir = source_dir
    self.num_base_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    self.added_ids: list[int] = []
    self.special = tuple(dict.fromkeys([EMB_TOKEN, *extra_special]))
    for token in self.special:
      if tokenizer.token_to_id(token) is None:
        tokenizer.add_special_tokens([tokenizers.AddedToken(token, special=True,
                                                            normalized=False)])
        self.added_ids.append(tokenizer.token_to_id(token))

  @classmethod
  def from_dir(cls, hf_dir: str, extra_special: Sequence[str] = ()) -> HFTokenizer:
    """Reads `hf_dir/tokenizer.json`; raises FileNotFoundError naming the path if it is missing."""
    path = os.path.join(hf_dir, _TOKENIZER_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    return cls(tokenizers.Tokenizer.from_file(path), source_dir=hf_dir,
               extra_special=extra_special)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int:
    token_id = self._tok.token_to_id(token)
    if token_id is None:
      raise KeyError(token)
    return token_id

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def emb_id(self) -> int:
    return self.token_to_id(EMB_TOKEN)

  def save(self, out_dir: str) -> None:
    """Writes `tokenizer.json` and, if the source had one, `tokenizer_config.json` to `out_dir`.

    The copied config gets `<|emb|>` (and the other special tokens of this wrapper) in its
    `added_tokens_decoder`, so that `transformers.AutoTokenizer.from_pretrained(out_dir)` maps
    them to the same ids.
    """
    config = self._read_source_config()
    os.makedirs(out_dir, exist_ok=True)
    self._tok.save(os.path.join(out_dir, _TOKENIZER_FILE))
    if config is not None:
      for token in self.special:
        _register_added_token(config, token, self.token_to_id(token))
      with open(os.path.join(out_dir, _TOKENIZER_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")

  def _read_source_config(self) -> dict[str, Any] | None:
    if self.source_dir is None:
      return None
    path = os.path.join(self.source_dir, _TOKENIZER_CONFIG_FILE)
    if not os.path.isfile(path):
      return None
    with open(path, encoding="utf-8") as f:
      return json.load(f)


def _register_added_token(config: dict[str, Any], token: str, token_id: int) -> None:
  """Puts `token` at `token_id` in a tokenizer_config's `added_tokens_decoder`, as special."""
  decoder = config.setdefault("added_tokens_decoder", {})
  existing = decoder.get(str(token_id))
  if existing is not None and existing.get("content") != token:
    raise ValueError(f"{_TOKENIZER_CONFIG_FILE}: id {token_id} is {existing.get('content')!r} in "
                     f"added_tokens_decoder, but tokenizer.json has {token!r} there")
  decoder[str(token_id)] = {"content": token, "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False, "special": True}


class SentencePieceTokenizer:
  """A SentencePiece model whose user symbols (`<|emb|>` among them) are single, unsplittable
  ids.

  Attributes:
    num_base_tokens: pieces of the model file; `added_ids`: the ids of the tokens loading
      appended (`<|emb|>`, an end-of-reasoning marker), as `HFTokenizer` has them.
  """

  def __init__(self, processor: spm.SentencePieceProcessor, *, num_base_tokens: int | None = None,
               added_ids: Sequence[int] = ()):
    self._sp = processor
    self.num_base_tokens = (processor.get_piece_size() if num_base_tokens is None
                            else num_base_tokens)
    self.added_ids = list(added_ids)

  @classmethod
  def from_file(cls, path: str, *, add_emb: bool = True,
                extra_special: Sequence[str] = ()) -> SentencePieceTokenizer:
    """Loads a `.model` file; raises FileNotFoundError naming the path if it is missing.

    `<|emb|>` (unless `add_emb` is False) and each of `extra_special` that the model lacks (a
    backbone's tokenizer, trained before TRACE) are appended as user symbols after its last
    piece, as `HFTokenizer` adds them: `added_ids` lists their ids, `num_base_tokens` counts the
    pieces before them (the rows `vocab.add_token_rows` averages for the new ones).
    """
    if not os.path.isfile(path):
      raise FileNotFoundError(f"sentencepiece model not found: {path}")
    sp = spm.SentencePieceProcessor(model_file=path)
    wanted = dict.fromkeys([EMB_TOKEN] * add_emb + list(extra_special))
    missing = [token for token in wanted if not _has_piece(sp, token)]
    if not missing:
      return cls(sp)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    base = len(proto.pieces)
    for token in missing:
      proto.pieces.add(piece=token, score=0.0,
                       type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    grown = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return cls(grown, num_base_tokens=base, added_ids=range(base, base + len(missing)))

  @classmethod
  def train(cls, texts: Iterable[str], out_prefix: str, vocab_size: int,
            user_symbols: Sequence[str] = (), model_type: str = "bpe",
            add_emb: bool = True) -> SentencePieceTokenizer:
    """Trains a model on `texts`, writes `out_prefix.model` / `.vocab` and loads it.

    Training is deterministic: every sentence is used in order on one thread. Byte fallback is on,
    so any text encodes without unknown ids.

    Args:
      texts: training sentences.
      out_prefix: path prefix of the written files; its directory is created.
      vocab_size: total ids, including `<unk>`, `<s>`, `</s>`, the 256 bytes and user symbols.
      user_symbols: extra tokens that always encode to one id, e.g. `<|image_pad|>`; `EMB_TOKEN`
        is added first unless `add_emb` is False.
      model_type: "bpe" or "unigram".
      add_emb: False for a backbone's tokenizer, which gets `<|emb|>` later (`from_file`).
    """
    if model_type not in ("bpe", "unigram"):
      raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    out_dir = os.path.dirname(out_prefix)
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
    symbols = list(dict.fromkeys([EMB_TOKEN] * add_emb + list(user_symbols)))
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=out_prefix, vocab_size=vocab_size,
      model_type=model_type, user_defined_symbols=symbols, byte_fallback=True,
      input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=1)
    return cls.from_file(f"{out_prefix}.model", add_emb=add_emb)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, add_bos=False, add_eos=False)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode(list(ids))

  def token_to_id(self, token: str) -> int:
    if not _has_piece(self._sp, token):
      raise KeyError(token)
    return self._sp.piece_to_id(token)

  def save(self, out_dir: str) -> str:
    """Writes the model, added tokens included, as `out_dir/sentencepiece.model` (what
    `from_file` reads back); returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, SENTENCEPIECE_FILE)
    with open(path, "wb") as f:
      f.write(self._sp.serialized_model_proto())
    return path

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def emb_id(self) -> int:
    return self.token_to_id(EMB_TOKEN)


def _has_piece(sp: spm.SentencePieceProcessor, token: str) -> bool:
  token_id = sp.piece_to_id(token)
  return token_id != sp.unk_id() or token == sp.id_to_piece(token_id)
