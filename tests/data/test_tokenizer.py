"""The Qwen3 tokenizer: pinned ids, lossless round trips, and the configs' padded vocabulary."""

import importlib
import pathlib
import unicodedata

import pytest

from meki_jax.data import tokenizer as tokenizer_lib
from meki_jax.data.embedded import stdlib_files

# Ids of Qwen2/Qwen3's BPE (shared vocabulary). The chat-template pieces are the ids every Qwen
# chat prompt starts with; digits are single tokens ('0' is byte rank 15, so '1' = 16) because
# the pre-tokeniser splits numbers into digits; the code line shows 4-space indentation as
# '   ' (262) + ' return' (470).
PINNED = [
    ('Hello world', [9707, 1879]),
    ('Hello, world!', [9707, 11, 1879, 0]),
    ('You are a helpful assistant.', [2610, 525, 264, 10950, 17847, 13]),
    ('system', [8948]),
    ('user', [872]),
    ('assistant', [77091]),
    ('12345', [16, 17, 18, 19, 20]),
    ('def f(x):\n    return x + 1\n', [750, 282, 2075, 982, 262, 470, 856, 488, 220, 16, 198]),
    ('\n', [198]),
    ('\n\n', [271]),
    (' ', [220]),
    ('你好', [108386]),
]
ROUND_TRIPS = {
    'code': 'class A(B):\n\tdef __init__(self, *args, **kw):\n\t\tsuper().__init__()  # ok\n',
    'cjk': '日本語のテキスト、中文文本。한국어 텍스트',
    'emoji': 'ok 😀👍🏽 family 👨\u200d👩\u200d👧 flag 🇯🇵',
    'combining_marks': 'q\u0307 x\u0323\u0301 नमस्ते ภาษาไทย',  # NFC-stable: no precomposed form
    'whitespace_runs': '\t\t  x   \n\n\n   y  \r\n\r\n\u00a0\u3000z     ',
    'special_token_text': 'a <|endoftext|> b <|im_start|>user\n<think></think>',
    'bytes_and_controls': '\x00\x01\x7f\ufeff\ufffd\U0010ffff',
}


@pytest.fixture(scope='module')
def qwen3():
  return tokenizer_lib.load_tokenizer('qwen3')


@pytest.mark.parametrize('text,token_ids', PINNED, ids=[repr(t)[:24] for t, _ in PINNED])
def test_known_encodings(qwen3, text, token_ids):
  assert qwen3.encode(text) == token_ids


def test_special_token_ids(qwen3):
  assert qwen3.eod_id == 151_643
  assert qwen3.vocab_size == 151_669  # 151,643 BPE ranks + 26 special tokens
  assert qwen3.decode([151_643, 151_644, 151_645]) == '<|endoftext|><|im_start|><|im_end|>'
  assert qwen3.decode([151_667, 151_668]) == '<think></think>'


@pytest.mark.parametrize('text', ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_round_trip_is_lossless(qwen3, text):
  token_ids = qwen3.encode(text)
  assert qwen3.decode(token_ids) == text
  assert all(0 <= i < qwen3.eod_id for i in token_ids)  # special tokens never come from text


def test_text_is_nfc_normalised(qwen3):
  decomposed = 'Cafe\u0301 e\u0308'
  assert qwen3.encode(decomposed) == qwen3.encode(unicodedata.normalize('NFC', decomposed))
  assert qwen3.decode(qwen3.encode(decomposed)) == 'Café ë'


def test_a_split_multibyte_character_decodes_to_the_replacement_character(qwen3):
  token_ids = qwen3.encode('𝔘')  # a 4-byte character, several byte-level tokens
  assert len(token_ids) > 1
  assert qwen3.decode(token_ids[:1]) == '\ufffd'


CONFIGS = pathlib.Path(__file__).parents[2] / 'configs'


@pytest.mark.parametrize('name', sorted(path.stem for path in CONFIGS.glob('*.py')
                                        if path.stem not in ('__init__', 'base')))
def test_configs_pad_the_vocabulary_to_151680(qwen3, name):
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.model.vocab_size == 151_680
  assert config.model.vocab_size % 128 == 0 and config.model.vocab_size >= qwen3.vocab_size
  assert config.data.tokenizer == 'qwen3' and config.data.eod_id == qwen3.eod_id


@pytest.fixture(scope='module')
def tokenizer_json(tmp_path_factory):
  """Qwen3 as a Hugging Face tokenizer.json, converted from the same BPE ranks by transformers.

  The Rust BPE of `tokenizers` is an implementation independent of tiktoken's.
  """
  from tokenizers import normalizers
  from transformers.convert_slow_tokenizer import TikTokenConverter
  converted = TikTokenConverter(vocab_file=str(tokenizer_lib._qwen3_ranks_path()),
                                pattern=tokenizer_lib.QWEN3_PATTERN,
                                extra_special_tokens=list(tokenizer_lib.QWEN3_SPECIAL_TOKENS))
  hf_tokenizer = converted.converted()
  hf_tokenizer.normalizer = normalizers.NFC()
  path = tmp_path_factory.mktemp('hf') / 'tokenizer.json'
  hf_tokenizer.save(str(path))
  return path


def test_tokenizer_json_encodes_like_the_packaged_ranks(qwen3, tokenizer_json):
  hugging_face = tokenizer_lib.load_tokenizer(str(tokenizer_json))
  assert (hugging_face.eod_id, hugging_face.vocab_size) == (qwen3.eod_id, qwen3.vocab_size)
  texts = [text for text, _ in PINNED] + list(ROUND_TRIPS.values())
  texts += [path.read_text(errors='replace') for path in stdlib_files()[:40]]
  for text in texts:
    assert hugging_face.encode(text) == qwen3.encode(text), text[:80]
  assert hugging_face.decode(qwen3.encode(ROUND_TRIPS['cjk'])) == ROUND_TRIPS['cjk']


def test_an_unknown_tokenizer_name_fails_naming_it():
  with pytest.raises(FileNotFoundError, match='qwen9'):
    tokenizer_lib.load_tokenizer('qwen9')
