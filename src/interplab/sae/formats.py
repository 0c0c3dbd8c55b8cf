"""SAE folders on disk: interplab's own, SAELens' and EleutherAI sparsify's.

interplab    config.json  {"format_version": 1, "type": "interplab.sae", "config": {SAEConfig fields}}
             sae.safetensors  W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec, input_scale (),
                              threshold (jumprelu: (d_sae,), batchtopk: ())
SAELens      cfg.json + sae_weights.safetensors  (architectures 'standard', 'topk', 'jumprelu')
sparsify     cfg.json + sae.safetensors  (encoder.weight (d_sae, d_in), encoder.bias, W_dec, b_dec)

`load_sae(path)` tells them apart by their file names. Every problem raises `SAEFormatError`
(a ValueError) naming the file and saying what was expected.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interplab.errors import ArtifactError
from interplab.files import (atomic_folder, check_digest, check_replaceable, load_tensors, read_json_object,
                             save_tensors, tensors_digest, write_json)
from interplab.sae.config import SAEConfig
from interplab.sae.model import SAE

FORMAT_VERSION = 1
"""Version of interplab's own SAE folder format."""

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "sae.safetensors"
SAELENS_CONFIG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
SAELENS_VERSION_WRITTEN = "6.0.0"
"""The SAELens config version `save_saelens` writes (the 6.x layout)."""

_SITE_PATTERNS = (
    r"hook_embed",
    r"blocks\.\d+\.hook_resid_pre",
    r"blocks\.\d+\.hook_resid_mid",
    r"blocks\.\d+\.hook_resid_post",
    r"blocks\.\d+\.hook_mlp_out",
    r"blocks\.\d+\.hook_attn_out",
    r"blocks\.\d+\.attn\.hook_z",
    r"blocks\.\d+\.mlp\.hook_post",
    r"ln_final\.hook_normalized",
)
SUPPORTED_SITES = tuple(p.replace(r"\d+", "{i}").replace("\\", "") for p in _SITE_PATTERNS)
"""Site names (TransformerLens vocabulary) an SAE read from another library may be attached to."""


class SAEFormatError(ArtifactError):
    """An SAE folder or file that cannot be read or written as asked."""


# --------------------------------------------------------------------------------------------
# interplab's own format
# --------------------------------------------------------------------------------------------


def save_sae(sae: SAE, path: str | Path) -> Path:
    """Write `sae` as an interplab folder (config.json + sae.safetensors), swapped in as a whole: a
    failure leaves the previous SAE (or nothing), never new weights under an old config."""
    tensors = {name: t.detach().cpu() for name, t in sae.state_dict().items()}
    config = {"format_version": FORMAT_VERSION, "type": "interplab.sae", "config": sae.cfg.to_dict(),
              "tensors_digest": tensors_digest(tensors)}
    return _write_folder(Path(path), {WEIGHTS_FILE: (tensors, {"format": "interplab.sae"})}, {CONFIG_FILE: config})


def sae_digest(sae: SAE) -> str:
    """The digest of the SAE's parameters (as `save_sae` records it): its identity for a feature index."""
    return tensors_digest(sae.state_dict())


def _write_folder(folder: Path, tensor_files: dict, json_files: dict) -> Path:
    check_replaceable(folder, _is_sae_folder, "SAE folder")
    with atomic_folder(folder) as tmp:
        for name, (tensors, metadata) in tensor_files.items():
            save_tensors(tmp / name, tensors, metadata)
        for name, data in json_files.items():
            write_json(tmp / name, data)
    return folder


def _is_sae_folder(folder: Path) -> bool:
    try:
        detect_layout(folder)
    except SAEFormatError:
        return False
    return True


def load_sae(path: str | Path, *, site: str | None = None) -> SAE:
    """Load an SAE folder in any supported layout (interplab, SAELens, sparsify).

    site: the interplab site to attach the SAE to, overriding (or supplying) what the folder says.
    """
    layout = detect_layout(path)
    if layout == "interplab":
        sae = _load_interplab(Path(path))
        if site is not None:
            sae = _with_config(sae, site=_check_site(site, Path(path) / CONFIG_FILE))
        return sae
    if layout == "saelens":
        return load_saelens(path, site=site)
    return load_sparsify(path, site=site)


def detect_layout(path: str | Path) -> str:
    """'interplab', 'saelens' or 'sparsify', from the files in the folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise SAEFormatError(f"{folder} is not a folder; an SAE is a folder with a config and a safetensors file")
    if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        return "interplab"
    if (folder / SAELENS_CONFIG_FILE).is_file() and (folder / SAELENS_WEIGHTS_FILE).is_file():
        return "saelens"
    if (folder / SAELENS_CONFIG_FILE).is_file() and (folder / SPARSIFY_WEIGHTS_FILE).is_file():
        return "sparsify"
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise SAEFormatError(
        f"{folder} holds no SAE layout interplab knows (found {found}); expected "
        f"{CONFIG_FILE} + {WEIGHTS_FILE} (interplab), {SAELENS_CONFIG_FILE} + {SAELENS_WEIGHTS_FILE} "
        f"(SAELens) or {SAELENS_CONFIG_FILE} + {SPARSIFY_WEIGHTS_FILE} (sparsify)"
    )


def _load_interplab(folder: Path) -> SAE:
    config_file = folder / CONFIG_FILE
    data = _read_json(config_file)
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        hint = "upgrade interplab" if isinstance(version, int) and version > FORMAT_VERSION else "re-save it"
        raise SAEFormatError(
            f"{config_file}: format_version {version!r} is not supported (this interplab reads "
            f"version {FORMAT_VERSION}); {hint}"
        )
    try:
        cfg = SAEConfig.from_dict(data.get("config"))
    except (TypeError, ValueError) as error:
        raise SAEFormatError(f"{config_file}: {error}") from error
    tensors = _read_safetensors(folder / WEIGHTS_FILE)
    sae = _build(cfg, tensors, folder / WEIGHTS_FILE)  # names and shapes first: the clearer message
    _check_digest(data.get("tensors_digest"), tensors, config_file, folder / WEIGHTS_FILE)
    return sae


def _check_digest(expected: Any, tensors: dict[str, Tensor] | str, config_file: Path, weights_file: Path) -> None:
    """Refuse weights that are not the ones the config was written with (when it records a digest)."""
    if expected is not None and not isinstance(expected, str):
        raise SAEFormatError(f"{config_file}: tensors_digest must be a string, got {expected!r}")
    actual = tensors if isinstance(tensors, str) else tensors_digest(tensors)
    try:
        check_digest(expected, actual, config_file, weights_file)
    except ArtifactError as error:
        raise SAEFormatError(str(error)) from None


# --------------------------------------------------------------------------------------------
# SAELens
# --------------------------------------------------------------------------------------------

_SAELENS_FAMILY = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}


def load_saelens(path: str | Path, *, site: str | None = None) -> SAE:
    """Load a SAELens folder (cfg.json + sae_weights.safetensors), 6.x or older configs.

    Reads architectures 'standard' (ReLU), 'topk' and 'jumprelu' (BatchTopK SAEs are saved by
    SAELens as 'jumprelu'). A TopK SAE with rescale_acts_by_decoder_norm has its decoder norms
    folded into the encoder, which leaves its outputs unchanged.
    """
    folder = Path(path)
    config_file = folder / SAELENS_CONFIG_FILE
    raw = _read_json(config_file)
    family = _saelens_family(raw, config_file)
    _check_saelens_normalization(raw, config_file)
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise SAEFormatError(f"{config_file}: field 'metadata' must be a JSON object, got {type(metadata).__name__}")
    if metadata.get("hook_head_index", raw.get("hook_head_index")) is not None:
        raise SAEFormatError(f"{config_file}: SAEs on a single attention head (hook_head_index) are not supported")
    hook_name = metadata.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    site = _resolve_site(site, hook_name, saelens_hook_to_site, config_file)
    tensors = _read_safetensors(folder / SAELENS_WEIGHTS_FILE)
    digest = tensors_digest(tensors)
    if "log_threshold" in tensors:  # older SAELens JumpReLU checkpoints
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    fields = _saelens_fields(raw, family, tensors, config_file)
    model_id = metadata.get("model_name") or raw.get("model_name")
    cfg = _config(config_file, **fields, site=site, model_id=model_id if isinstance(model_id, str) else None)
    sae = _build(cfg, {**tensors, "input_scale": torch.ones(())}, folder / SAELENS_WEIGHTS_FILE)
    _check_digest(metadata.get("interplab_tensors_digest"), digest, config_file, folder / SAELENS_WEIGHTS_FILE)
    if family == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        _fold_decoder_norms_(sae)
    return sae


def save_saelens(sae: SAE, path: str | Path) -> Path:
    """Write `sae` as a SAELens 6.x folder that `sae_lens.SAE.load_from_disk` reads.

    The input scale s is folded into the weights (W_enc·s, W_dec/s, b_dec/s), so SAELens sees
    normalize_activations='none' and produces the same outputs on raw activations. 'relu' is saved as
    'standard'; 'batchtopk' as 'jumprelu' with its global threshold on every latent (as SAELens does).
    """
    cfg = sae.cfg
    architecture = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[cfg.family]
    tensors = {name: t.cpu() for name, t in _folded_saelens_tensors(sae).items()}
    config: dict[str, Any] = {
        "architecture": architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.subtract_decoder_bias,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if cfg.site.endswith("hook_z") else "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION_WRITTEN,
            "sae_lens_training_version": None,
            "hook_name": cfg.site or None,
            "model_name": cfg.model_id,
            "interplab_family": cfg.family,
            "interplab_tensors_digest": tensors_digest(tensors),
        },
    }
    if architecture == "topk":
        config.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    return _write_folder(Path(path), {SAELENS_WEIGHTS_FILE: (tensors, None)}, {SAELENS_CONFIG_FILE: config})


def saelens_hook_to_site(hook_name: str) -> str:
    """A SAELens/TransformerLens hook name as an interplab site; the vocabularies are the same, so
    this only checks that the hook is one interplab supports."""
    if any(re.fullmatch(pattern, hook_name) for pattern in _SITE_PATTERNS):
        return hook_name
    raise ValueError(f"hook {hook_name!r} is not a site interplab supports ({', '.join(SUPPORTED_SITES)})")


def _saelens_family(raw: dict[str, Any], config_file: Path) -> str:
    architecture = raw.get("architecture")
    activation = raw.get("activation_fn") or raw.get("activation_fn_str") or "relu"
    if architecture is None:  # pre-6.0 configs: the activation function decides
        architecture = "topk" if activation == "topk" else "standard"
    if architecture not in _SAELENS_FAMILY:
        raise SAEFormatError(
            f"{config_file}: SAELens architecture {architecture!r} is not supported; interplab reads "
            f"{sorted(_SAELENS_FAMILY)} (SAELens saves BatchTopK SAEs as 'jumprelu')"
        )
    if architecture == "standard" and activation not in ("relu", "topk"):
        raise SAEFormatError(
            f"{config_file}: a 'standard' SAE with activation {activation!r} is not supported; interplab reads ReLU"
        )
    if architecture == "standard" and activation == "topk":
        architecture = "topk"
    return _SAELENS_FAMILY[architecture]


def _check_saelens_normalization(raw: dict[str, Any], config_file: Path) -> None:
    norm = raw.get("normalize_activations") or "none"
    if norm is True:
        norm = "expected_average_only_in"
    if norm in ("none", False):
        return
    if norm == "expected_average_only_in":
        warnings.warn(
            f"{config_file}: normalize_activations='expected_average_only_in' has no stored scale; "
            "like SAELens at inference, interplab applies none (SAELens folds the scale into the "
            "weights at the end of training)",
            stacklevel=3,
        )
        return
    raise SAEFormatError(
        f"{config_file}: normalize_activations={norm!r} is not supported; interplab applies one fixed "
        "input scale ('none' or 'expected_average_only_in'), not per-token normalisation or whitening"
    )


def _saelens_fields(raw: dict[str, Any], family: str, tensors: dict[str, Tensor], config_file: Path) -> dict[str, Any]:
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    if family == "topk" and k is None:
        raise SAEFormatError(f"{config_file}: a TopK SAE needs 'k' in its config")
    return {
        "d_in": raw.get("d_in"),
        "d_sae": raw.get("d_sae"),
        "family": family,
        "k": k if family == "topk" else None,
        "subtract_decoder_bias": bool(raw.get("apply_b_dec_to_input", True)),
        "normalize_input": False,
        "dtype": _dtype_name(raw.get("dtype"), tensors, config_file),
    }


@torch.no_grad()
def _fold_decoder_norms_(sae: SAE) -> None:
    """TopK with rescale_acts_by_decoder_norm: pre·‖W_dec‖ then (f/‖W_dec‖) @ W_dec equals plain TopK
    with W_enc·n, b_enc·n, W_dec/n (n = row norms of W_dec)."""
    norms = sae.W_dec.norm(dim=-1).clamp_min(1e-8)
    sae.W_enc.mul_(norms)
    sae.b_enc.mul_(norms)
    sae.W_dec.div_(norms[:, None])


def _folded_saelens_tensors(sae: SAE) -> dict[str, Tensor]:
    scale = float(sae.input_scale)
    tensors = {
        "W_enc": sae.W_enc.detach() * scale,
        "b_enc": sae.b_enc.detach().clone(),
        "W_dec": sae.W_dec.detach() / scale,
        "b_dec": sae.b_dec.detach() / scale,
    }
    if scale == 1.0:  # keep the exact bits
        tensors.update(W_enc=sae.W_enc.detach().clone(), W_dec=sae.W_dec.detach().clone(), b_dec=sae.b_dec.detach().clone())
    if sae.cfg.family in ("jumprelu", "batchtopk"):
        tensors["threshold"] = sae.threshold.detach().expand(sae.cfg.d_sae).clone()
    return tensors


# --------------------------------------------------------------------------------------------
# EleutherAI sparsify
# --------------------------------------------------------------------------------------------

_LAYER = r"(?:.*\.)?(?:layers|h|blocks)\.(\d+)"
_SPARSIFY_HOOKPOINTS = (
    (_LAYER + r"", "blocks.{i}.hook_resid_post"),
    (_LAYER + r"\.mlp", "blocks.{i}.hook_mlp_out"),
    (_LAYER + r"\.mlp\.(?:down_proj|c_proj|dense_4h_to_h|fc2)", "blocks.{i}.hook_mlp_out"),
    (_LAYER + r"\.(?:self_attn|attn|attention)", "blocks.{i}.hook_attn_out"),
)


def sparsify_hookpoint_to_site(hookpoint: str) -> str:
    """A sparsify hookpoint (a module name; sparsify SAEs read the module's output) as an interplab site.

    'layers.6' → blocks.6.hook_resid_post; 'layers.6.mlp' and 'layers.6.mlp.down_proj' →
    blocks.6.hook_mlp_out; 'layers.6.self_attn' → blocks.6.hook_attn_out. 'layers.6.mlp.act_fn' is
    refused: its output is TransformerLens' mlp.hook_post only for ungated MLPs (for Llama, Qwen or
    Gemma it is act(gate), not act(gate)·up); pass site= when you know which it is.
    """
    for pattern, template in _SPARSIFY_HOOKPOINTS:
        match = re.fullmatch(pattern, hookpoint)
        if match:
            return template.format(i=int(match.group(1)))
    if re.fullmatch(_LAYER + r"\.mlp\.(?:act_fn|act)", hookpoint):
        raise ValueError(
            f"hookpoint {hookpoint!r} is ambiguous: the activation function's output equals "
            "mlp.hook_post only for ungated MLPs (in gated MLPs it is act(gate), not act(gate)·up)"
        )
    raise ValueError(
        f"hookpoint {hookpoint!r} does not name a block output, an MLP output or an attention output "
        "(e.g. 'layers.6', 'layers.6.mlp', 'layers.6.self_attn')"
    )


def load_sparsify(path: str | Path, *, site: str | None = None) -> SAE:
    """Load an EleutherAI sparsify folder (cfg.json + sae.safetensors), named after its hookpoint.

    Sparsify's TopK encodes TopK(ReLU((x − b_dec) @ encoder.weightᵀ + encoder.bias)), the same
    outputs as interplab's 'topk' with subtract_decoder_bias. Transcoders, skip connections and the
    'groupmax' activation are refused.
    """
    folder = Path(path)
    config_file = folder / SAELENS_CONFIG_FILE
    raw = _read_json(config_file)
    refused = (("transcode", "transcoders"), ("skip_connection", "skip connections"),
               ("embed_skip", "embedding skip connections"), ("gram_lookup", "n-gram lookup tables"))
    for key, what in refused:
        if raw.get(key):
            raise SAEFormatError(f"{config_file}: {what} ({key}=true) are not supported; interplab reads autoencoders")
    if raw.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{config_file}: activation {raw.get('activation')!r} is not supported; interplab reads 'topk'")
    tensors = _read_safetensors(folder / SPARSIFY_WEIGHTS_FILE)
    tensors = _rename_sparsify(tensors, folder / SPARSIFY_WEIGHTS_FILE)
    d_in = raw.get("d_in")
    d_sae = raw.get("num_latents") or (d_in * raw.get("expansion_factor", 0) if isinstance(d_in, int) else None)
    fields = dict(
        d_in=d_in, d_sae=d_sae, family="topk", k=raw.get("k"), normalize_input=False,
        subtract_decoder_bias=True, dtype=_dtype_name(None, tensors, config_file),
        site=_resolve_site(site, folder.name, sparsify_hookpoint_to_site, config_file),
        model_id=_read_sparsify_model_id(folder),
    )
    cfg = _config(config_file, **fields)
    tensors["input_scale"] = torch.ones(())
    return _build(cfg, tensors, folder / SPARSIFY_WEIGHTS_FILE)


def _rename_sparsify(tensors: dict[str, Tensor], weights_file: Path) -> dict[str, Tensor]:
    expected = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise SAEFormatError(
            f"{weights_file}: a sparsify TopK SAE holds {sorted(expected)}; missing {missing}, unexpected {extra}"
        )
    return {
        "W_enc": tensors["encoder.weight"].T.contiguous(),  # (d_sae, d_in) -> (d_in, d_sae)
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }


def _read_sparsify_model_id(folder: Path) -> str | None:
    """sparsify writes the run's config.json (with the model name) beside the hookpoint folders."""
    run_config = folder.parent / "config.json"
    if not run_config.is_file():
        return None
    try:
        model = read_json_object(run_config).get("model")
    except (OSError, ArtifactError):
        return None
    return model if isinstance(model, str) else None


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    shapes = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
        "input_scale": (),
    }
    if cfg.family == "jumprelu":
        shapes["threshold"] = (cfg.d_sae,)
    elif cfg.family == "batchtopk":
        shapes["threshold"] = ()
    return shapes


def _build(cfg: SAEConfig, tensors: dict[str, Tensor], weights_file: Path) -> SAE:
    """An SAE from a config and its tensors, after checking names and shapes against the config."""
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise SAEFormatError(
            f"{weights_file}: tensors do not match a {cfg.family!r} SAE: missing {missing}, unexpected {extra}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise SAEFormatError(
                f"{weights_file}: {name} has shape {tuple(tensors[name].shape)} but the config "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) needs {shape}; the weights belong to a different SAE"
            )
    sae = SAE(cfg)
    state = {name: t.to(sae.state_dict()[name].dtype) for name, t in tensors.items()}
    sae.load_state_dict(state)
    return sae


def _config(source: Path, **fields: Any) -> SAEConfig:
    try:
        return SAEConfig(**fields)
    except (TypeError, ValueError) as error:
        raise SAEFormatError(f"{source}: {error}") from error


def _with_config(sae: SAE, **changes: Any) -> SAE:
    new = SAE(dataclasses.replace(sae.cfg, **changes))
    new.load_state_dict(sae.state_dict())
    return new


def _resolve_site(site: str | None, found: str | None, to_site, source: Path) -> str:
    if site is not None:
        return _check_site(site, source)
    if not found:
        return ""
    try:
        return to_site(found)
    except ValueError as error:
        raise SAEFormatError(f"{source}: cannot map to an interplab site: {error}; pass site=... to load it anyway") from error


def _check_site(site: str, source: Path) -> str:
    if not isinstance(site, str):
        raise SAEFormatError(f"site must be a string such as 'blocks.6.hook_resid_post', got {site!r}")
    try:
        return saelens_hook_to_site(site)
    except ValueError as error:
        raise SAEFormatError(f"{source}: site {error}") from error


def _dtype_name(declared: Any, tensors: dict[str, Tensor], config_file: Path) -> str:
    if isinstance(declared, str) and declared:
        name = declared.removeprefix("torch.")
    else:
        name = str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else "float32"
    if name not in ("float32", "float64", "bfloat16", "float16"):
        raise SAEFormatError(f"{config_file}: dtype {declared!r} is not supported")
    return name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path, "SAE config")
    except ArtifactError as error:
        raise SAEFormatError(str(error)) from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        tensors = load_tensors(path, "SAE weights file")
    except ArtifactError as error:
        raise SAEFormatError(str(error)) from None
    for name, tensor in tensors.items():
        if tensor.is_complex():
            raise SAEFormatError(f"{path}: tensor {name} is complex ({tensor.dtype}); SAE weights are real")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SAEFormatError(f"{path}: tensor {name} holds NaN or infinite values")
    return tensors
