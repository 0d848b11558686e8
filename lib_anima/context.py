"""The reference context: learned tokens for every cross-attention site, its file format and validation.

File format (one ``.safetensors`` file per context):

* tensor ``anima.tokens``: float ``[sites, n_tokens, context_dim]``, the tokens of each ``attn2`` site in the
  order of :func:`lib_anima.layout.find_sites` (module path order of the UNet).
* tensor ``anima.site_weights`` (optional): float ``[sites]``, the default per-site weight.
* metadata (all strings): ``anima.format_version``, ``anima.arch`` (sd1/sd2/sdxl), ``anima.context_dim``,
  ``anima.n_tokens``, ``anima.n_sites``, ``anima.site_layout`` (a short id of the site names),
  ``anima.site_names`` (JSON list), ``anima.training`` (JSON object: the training record),
  ``anima.default_scale``, ``anima.default_mode``. Any other key is kept as it is on load and save.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from lib_anima.errors import ArgumentError, ContextFileError, ContextMismatchError
from lib_anima.fileio import atomic_write_bytes

FORMAT_VERSION = 1
TOKENS_KEY = "anima.tokens"
SITE_WEIGHTS_KEY = "anima.site_weights"
ARCHITECTURES = ("sd1", "sd2", "sdxl")
MODES = ("positive", "negative")
SCALE_MIN, SCALE_MAX = 0.0, 4.0
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

_META = "anima."
_KNOWN_KEYS = {
    _META + k
    for k in (
        "format_version", "arch", "context_dim", "n_tokens", "n_sites", "site_layout",
        "site_names", "training", "default_scale", "default_mode",
    )
}


def site_layout_id(site_names: list[str]) -> str:
    """A short id of a site layout: the count plus a hash of the module paths."""
    digest = hashlib.sha256("\n".join(site_names).encode()).hexdigest()[:8]
    return f"{len(site_names)}-{digest}"


def check_scale(value: object, what: str = "scale") -> float:
    """A scale as float in [0, 4]; anything else is an ArgumentError (never silently clamped)."""
    try:
        scale = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ArgumentError(f"{what} must be a number from {SCALE_MIN:g} to {SCALE_MAX:g}, got {value!r}") from None
    if not math.isfinite(scale) or not SCALE_MIN <= scale <= SCALE_MAX:
        raise ArgumentError(f"{what} must be from {SCALE_MIN:g} to {SCALE_MAX:g}, got {value!r}")
    return scale


def check_mode(value: object) -> str:
    mode = str(value).strip().lower()
    if mode not in MODES:
        raise ArgumentError(f"mode must be one of {', '.join(MODES)}, got {value!r}")
    return mode


@dataclass
class ReferenceContext:
    """Tokens ``[sites, n_tokens, context_dim]`` plus what is known about them."""

    tokens: torch.Tensor
    arch: str
    site_names: list[str]
    site_weights: torch.Tensor | None = None
    training: dict[str, Any] = field(default_factory=dict)
    default_scale: float = 1.0
    default_mode: str = "positive"
    extra_metadata: dict[str, str] = field(default_factory=dict)
    name: str = ""
    path: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def n_sites(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def context_dim(self) -> int:
        return int(self.tokens.shape[2])

    @property
    def shorthash(self) -> str:
        return (self.sha256 or "")[:12]

    @property
    def site_layout(self) -> str:
        return site_layout_id(self.site_names)

    def validate(self) -> None:
        """Raise ArgumentError when the tensors or fields are inconsistent."""
        t = self.tokens
        if not isinstance(t, torch.Tensor):
            raise ArgumentError("tokens must be a torch tensor")
        if t.dim() != 3:
            raise ArgumentError(f"tokens must have rank 3 [sites, n_tokens, context_dim], got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise ArgumentError(f"tokens must be floating point, got {t.dtype}")
        if min(t.shape) < 1:
            raise ArgumentError(f"tokens must not be empty, got shape {list(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ArgumentError("tokens contain NaN or infinite values")
        if self.arch not in ARCHITECTURES:
            raise ArgumentError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if len(self.site_names) != t.shape[0]:
            raise ArgumentError(f"{len(self.site_names)} site names for {t.shape[0]} sites")
        if self.site_weights is not None:
            w = self.site_weights
            if w.dim() != 1 or w.shape[0] != t.shape[0] or not w.is_floating_point():
                raise ArgumentError(f"site weights must be a float vector of {t.shape[0]}, got shape {list(w.shape)}")
            if not bool(torch.isfinite(w).all()):
                raise ArgumentError("site weights contain NaN or infinite values")
        self.default_scale = check_scale(self.default_scale, "default scale")
        self.default_mode = check_mode(self.default_mode)

    def check_fits(self, site_names: list[str], context_dim: int) -> None:
        """Raise ContextMismatchError unless this context fits a model with these sites."""
        label = self.name or self.path or "context"
        if self.n_sites != len(site_names):
            raise ContextMismatchError(
                f"{label!r} has {self.n_sites} cross-attention sites ({self.arch}) but the loaded model has "
                f"{len(site_names)}: it was made for another model architecture"
            )
        if self.context_dim != context_dim:
            raise ContextMismatchError(
                f"{label!r} has context_dim {self.context_dim} ({self.arch}) but the loaded model's cross-attention "
                f"takes {context_dim}: it was made for another model architecture"
            )
        if self.site_names != list(site_names):
            first = next(i for i, (a, b) in enumerate(zip(self.site_names, site_names, strict=False)) if a != b)
            raise ContextMismatchError(
                f"{label!r} site {first} is {self.site_names[first]!r} but the loaded model's is {site_names[first]!r}"
            )

    def metadata(self) -> dict[str, str]:
        meta = dict(self.extra_metadata)
        meta.update({
            _META + "format_version": str(FORMAT_VERSION),
            _META + "arch": self.arch,
            _META + "context_dim": str(self.context_dim),
            _META + "n_tokens": str(self.n_tokens),
            _META + "n_sites": str(self.n_sites),
            _META + "site_layout": self.site_layout,
            _META + "site_names": json.dumps(self.site_names),
            _META + "training": json.dumps(self.training, sort_keys=True),
            _META + "default_scale": repr(float(self.default_scale)),
            _META + "default_mode": self.default_mode,
        })
        return meta

    def to_bytes(self) -> bytes:
        tensors = {TOKENS_KEY: self.tokens.detach().to("cpu", torch.float32).contiguous()}
        if self.site_weights is not None:
            tensors[SITE_WEIGHTS_KEY] = self.site_weights.detach().to("cpu", torch.float32).contiguous()
        return _sorted_metadata(save_safetensors_bytes(tensors, metadata=self.metadata()))

    def save(self, path: str) -> None:
        """Write atomically; sets path and sha256."""
        data = self.to_bytes()
        atomic_write_bytes(path, data)
        self.path = path
        self.sha256 = hashlib.sha256(data).hexdigest()


def _sorted_metadata(data: bytes) -> bytes:
    """`data` with its header's metadata in key order. safetensors writes the metadata in hash-map order, which
    differs from call to call, so the same context would otherwise get a different file (and sha256) each save."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors keeps the tensor data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw + data[8 + header_len :]


# ---- reading --------------------------------------------------------------------------------------------------


def read_header(path: str) -> dict[str, Any]:
    """The safetensors JSON header of `path` (tensor entries plus ``__metadata__``), checked for sanity."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ContextFileError(path, f"cannot be read ({e.strerror or e})") from None
    if size == 0:
        raise ContextFileError(path, "is empty (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise ContextFileError(path, f"is {size} bytes; a context file may be at most {MAX_FILE_BYTES} bytes")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ContextFileError(path, "is not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ContextFileError(path, "is not a safetensors file (header length out of range)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ContextFileError(path, "is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ContextFileError(path, "is not a safetensors file (header is not a JSON object)")
    data_len = size - 8 - header_len
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[1] <= data_len):
            raise ContextFileError(path, f"is truncated or corrupt (tensor {key!r} lies beyond the end of the file)")
    return header


def _metadata_int(path: str, meta: dict[str, str], key: str) -> int:
    try:
        return int(meta[_META + key])
    except KeyError:
        raise ContextFileError(path, f"metadata {_META + key!r} is missing") from None
    except ValueError:
        raise ContextFileError(path, f"metadata {_META + key!r} is not an integer: {meta[_META + key]!r}") from None


def _metadata_json(path: str, meta: dict[str, str], key: str, kind: type, default: Any) -> Any:
    raw = meta.get(_META + key)
    if raw is None:
        return default
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ContextFileError(path, f"metadata {_META + key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise ContextFileError(path, f"metadata {_META + key!r} must be a JSON {kind.__name__}")
    return value


@dataclass
class ContextInfo:
    """What the header says about a context file, without loading its tensors."""

    path: str
    arch: str
    n_sites: int
    n_tokens: int
    context_dim: int
    site_layout: str
    metadata: dict[str, str]
    sha256: str = ""

    @property
    def shorthash(self) -> str:
        return self.sha256[:12]

    @property
    def training(self) -> dict[str, Any]:
        try:
            value = json.loads(self.metadata.get(_META + "training", "{}"))
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def default_scale(self) -> float:
        return float(self.metadata.get(_META + "default_scale", 1.0))

    @property
    def default_mode(self) -> str:
        return self.metadata.get(_META + "default_mode", "positive")


def inspect_file(path: str) -> ContextInfo:
    """Validate the header of a context file (format, version, shapes, dtypes) and describe it."""
    header = read_header(path)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ContextFileError(path, "metadata must map strings to strings")
    version = meta.get(_META + "format_version")
    if version is None:
        raise ContextFileError(path, "is not an anima context (metadata 'anima.format_version' is missing)")
    if version != str(FORMAT_VERSION):
        raise ContextFileError(path, f"has format version {version!r}; this extension reads version {FORMAT_VERSION}")
    entry = header.get(TOKENS_KEY)
    if not isinstance(entry, dict):
        raise ContextFileError(path, f"tensor {TOKENS_KEY!r} is missing")
    if entry.get("dtype") not in FLOAT_DTYPES:
        raise ContextFileError(path, f"tensor {TOKENS_KEY!r} has dtype {entry.get('dtype')}; a float type is required")
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) != 3:
        raise ContextFileError(path, f"tensor {TOKENS_KEY!r} must have rank 3 [sites, n_tokens, context_dim], got shape {shape}")
    if min(shape) < 1:
        raise ContextFileError(path, f"tensor {TOKENS_KEY!r} is empty (shape {shape})")
    arch = meta.get(_META + "arch")
    if arch not in ARCHITECTURES:
        raise ContextFileError(path, f"metadata 'anima.arch' must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    for key, actual in zip(("n_sites", "n_tokens", "context_dim"), shape, strict=False):
        declared = _metadata_int(path, meta, key)
        if declared != actual:
            raise ContextFileError(path, f"metadata 'anima.{key}' says {declared} but the tokens have {actual}")
    weights = header.get(SITE_WEIGHTS_KEY)
    if weights is not None and (weights.get("shape") != [shape[0]] or weights.get("dtype") not in FLOAT_DTYPES):
        raise ContextFileError(path, f"tensor {SITE_WEIGHTS_KEY!r} must be a float vector of {shape[0]}")
    site_names = _metadata_json(path, meta, "site_names", list, None)
    if site_names is None or len(site_names) != shape[0] or not all(isinstance(s, str) for s in site_names):
        raise ContextFileError(path, f"metadata 'anima.site_names' must list {shape[0]} module paths")
    return ContextInfo(
        path=path, arch=arch, n_sites=shape[0], n_tokens=shape[1], context_dim=shape[2],
        site_layout=site_layout_id(site_names), metadata=meta,
    )


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_context(path: str, name: str | None = None) -> ReferenceContext:
    """Load and fully validate a context file; every problem is a ContextFileError naming the file."""
    info = inspect_file(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise ContextFileError(path, f"is corrupt ({e})") from None
    meta = info.metadata
    tokens = tensors[TOKENS_KEY].float()
    if not bool(torch.isfinite(tokens).all()):
        raise ContextFileError(path, "tokens contain NaN or infinite values")
    weights = tensors.get(SITE_WEIGHTS_KEY)
    try:
        return ReferenceContext(
            tokens=tokens,
            arch=info.arch,
            site_names=json.loads(meta[_META + "site_names"]),
            site_weights=None if weights is None else weights.float(),
            training=_metadata_json(path, meta, "training", dict, {}),
            default_scale=meta.get(_META + "default_scale", "1.0"),  # type: ignore[arg-type]
            default_mode=meta.get(_META + "default_mode", "positive"),
            extra_metadata={k: v for k, v in meta.items() if k not in _KNOWN_KEYS},
            name=name or os.path.splitext(os.path.basename(path))[0],
            path=path,
            sha256=hashlib.sha256(data).hexdigest(),
        )
    except ArgumentError as e:
        raise ContextFileError(path, str(e)) from None
