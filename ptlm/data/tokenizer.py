"""Get a fast (Rust) tokenizer into the dataset folder, and read it back without transformers.

`ptlm prepare` encodes with the `tokenizers` library directly: importing transformers pulls in
torch (~300 MB resident) for nothing. Whatever the user names (a folder with tokenizer.json, a
GPT-2-style vocab.json + merges.txt, a hub name, or a BPE trained here) ends up as a folder that
both `tokenizers.Tokenizer.from_file` and `transformers.AutoTokenizer.from_pretrained` load, so
training and generation use exactly the tokenizer the data was made with.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ptlm.data.shards import sha256_file
from ptlm.errors import PtlmError

if TYPE_CHECKING:  # the annotations only: prepare imports tokenizers when it encodes
    import tokenizers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")
DEFAULT_SPECIAL = "<|endoftext|>"  # GPT-2's EOS; also used for tokenizers trained here
UNSET_MAX_LENGTH = 10**9  # transformers writes ~1e30 when a tokenizer has no length limit
TRAIN_MIN_FREQUENCY = 2  # a merge must be seen twice: avoids memorizing one-off strings


@dataclass(frozen=True)
class DocumentFrame:
    """The special ids around every document in the packed stream: the BOS the tokenizer puts at
    the start of a text (Llama 3, Gemma; None for GPT-2, OPT's BPE, Qwen) and the EOS after it."""

    bos_id: int | None
    eos_id: int

    @property
    def extra_tokens(self) -> int:
        return 1 + (self.bos_id is not None)


@dataclass
class TokenizerInfo:
    source: str  # what the user named, or "trained:<vocab size>"
    vocab_size: int  # len(tokenizer): every id the tokenizer can emit is below this
    eos_token: str
    eos_id: int
    sha256: str  # of tokenizer.json: the tokenizer's identity
    model_max_length: int | None
    bos_id: int | None = None  # put before every document (the tokenizer adds one to a text)

    @property
    def frame(self) -> DocumentFrame:
        return DocumentFrame(bos_id=self.bos_id, eos_id=self.eos_id)

    def to_dict(self) -> dict:
        return asdict(self)


def _special_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _write_config(folder: Path, eos: str, model_max_length: int | None) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
              "unk_token": eos, "clean_up_tokenization_spaces": False}
    if model_max_length:
        config["model_max_length"] = model_max_length
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _byte_level_bpe(model) -> "tokenizers.Tokenizer":
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _from_vocab_merges(folder: Path, dest: Path, eos_token: str | None) -> None:
    from tokenizers.models import BPE

    tok = _byte_level_bpe(BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    eos = eos_token or DEFAULT_SPECIAL
    if tok.token_to_id(eos) is None:
        raise PtlmError(f"{folder}: vocab.json has no EOS token {eos!r}; pass --eos-token TOKEN")
    tok.save(str(dest / "tokenizer.json"))
    _write_config(dest, eos, None)


def _from_transformers(spec: str, dest: Path) -> None:
    from transformers import AutoTokenizer  # imports torch: only on this path

    try:
        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as e:
        raise PtlmError(f"cannot load tokenizer {spec!r}: {type(e).__name__}: {e}. Give a local "
                        "folder with tokenizer.json, or vocab.json + merges.txt") from None
    if not getattr(tok, "is_fast", False):
        raise PtlmError(f"tokenizer {spec!r} has no fast (Rust) version; ptlm needs one")
    tok.save_pretrained(str(dest))


def train_bpe(texts: Iterable[str], vocab_size: int, dest: Path) -> None:
    """Train a byte-level BPE (GPT-2 style) on the corpus with `tokenizers`."""
    from tokenizers import pre_tokenizers, trainers
    from tokenizers.models import BPE

    if vocab_size < 256 + 1:
        raise PtlmError(f"--train-tokenizer {vocab_size}: a byte-level BPE needs at least 257 "
                        "ids (256 bytes + EOS)")
    tok = _byte_level_bpe(BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=TRAIN_MIN_FREQUENCY,
                                  special_tokens=[DEFAULT_SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    _write_config(dest, DEFAULT_SPECIAL, None)


def materialize(spec: str, dest: Path, eos_token: str | None = None) -> None:
    """Write the tokenizer named by `spec` into `dest` as a self-contained fast-tokenizer folder."""
    dest.mkdir(parents=True, exist_ok=True)
    folder = Path(spec)
    if (folder / "tokenizer.json").exists():
        for name in TOKENIZER_FILES:
            if (folder / name).exists():
                shutil.copyfile(folder / name, dest / name)
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        _from_vocab_merges(folder, dest, eos_token)
    elif folder.exists() and not folder.is_dir():
        raise PtlmError(f"--tokenizer {spec}: give the folder that holds tokenizer.json, or "
                        "vocab.json + merges.txt, not a file")
    else:
        _from_transformers(spec, dest)
    if eos_token:  # an explicit choice wins over what the folder says
        config = _read_json(dest / "tokenizer_config.json")
        config["eos_token"] = eos_token
        (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def load(folder: Path) -> "tokenizers.Tokenizer":
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise PtlmError(f"{folder}: no tokenizer.json")
    return Tokenizer.from_file(str(path))


def describe(folder: Path, source: str) -> TokenizerInfo:
    """Read identity, vocabulary size and EOS of the tokenizer folder written by materialize()."""
    folder = Path(folder)
    tok = load(folder)
    config = _read_json(folder / "tokenizer_config.json")
    special = _read_json(folder / "special_tokens_map.json")
    eos = _special_content(config.get("eos_token")) or _special_content(special.get("eos_token"))
    if not eos:
        raise PtlmError(f"tokenizer {source!r} declares no EOS token; pass --eos-token TOKEN "
                        "(the token appended after every document)")
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise PtlmError(f"tokenizer {source!r}: EOS token {eos!r} is not in its vocabulary; pass "
                        "--eos-token with a token it has")
    max_len = config.get("model_max_length")
    max_len = int(max_len) if isinstance(max_len, (int, float)) and max_len < UNSET_MAX_LENGTH \
        else None
    digest = sha256_file(folder / "tokenizer.json")
    return TokenizerInfo(source=source, vocab_size=tok.get_vocab_size(with_added_tokens=True),
                         eos_token=eos, eos_id=eos_id, sha256=digest, model_max_length=max_len,
                         bos_id=leading_special_id(tok))


BOS_PROBE_TEXT = "a"


def leading_special_id(tok) -> int | None:
    """The id the tokenizer itself puts before a text (its post-processor's BOS: Llama 3's
    <|begin_of_text|>, Gemma's <bos>), read from what it does rather than from its config."""
    plain = tok.encode(BOS_PROBE_TEXT, add_special_tokens=False).ids
    framed = tok.encode(BOS_PROBE_TEXT, add_special_tokens=True).ids
    if len(framed) > len(plain) and framed[1:1 + len(plain)] == plain:
        return framed[0]
    return None


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizer.json files encode text to the same ids: the same bytes, or the same
    model (vocabulary, merges), normalizer, pre-tokenizer and added tokens (files written by
    other versions of `tokenizers` differ in formatting only)."""
    a, b = Path(a), Path(b)
    if sha256_file(a) == sha256_file(b):
        return True

    def identity(path):
        try:
            j = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        added = sorted((t.get("id"), t.get("content")) for t in j.get("added_tokens") or [])
        return json.dumps([j.get("model"), j.get("normalizer"), j.get("pre_tokenizer"), added],
                          sort_keys=True)

    ia = identity(a)
    return ia is not None and ia == identity(b)
