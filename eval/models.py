"""Turn a ``--model`` argument into an ``nn.Module`` that maps [N,3,112,112] in [-1,1] to [N,D].

Accepted forms:
- ``model.pt`` (or ``.pth``): a plain backbone ``state_dict`` in insightface's format,
  built with ``--network`` (a backbone name for ``trainer.backbones.get_backbone`` such as
  ``r50``, or a ``package.module:factory`` spec). ``module.``/``backbone.`` prefixes from
  DDP/checkpoint wrappers are stripped; the embedding size is read from the weights.
- a TorchScript archive (``torch.jit.save``): loaded as is, no ``--network`` needed (only
  when named as the file itself, never picked from a folder: it carries code).
- a run / checkpoint directory: ``model.pt`` inside it (insightface's output layout),
  ``trainer.pt`` (a step directory), the newest complete ``checkpoints/step_*/trainer.pt``,
  else the newest ``*.pt``/``*.pth``; backbone weights are found under one of the keys
  ``backbone``, ``state_dict_backbone``, ``model``, ``state_dict``. Without ``--network``
  the backbone name comes from the checkpoint's config (``model.backbone``) or a
  ``config.yaml`` next to it; that name must be one of the trainer's backbones: a
  ``module:factory`` read from a file is never imported or called (it would run code
  the user did not choose); pass it as ``--network`` to use it.
- ``model.onnx``: run with onnxruntime (wrapped in an ``nn.Module``).
- ``package.module:factory``: call the factory (a model with built-in weights, tests).

Nothing read from a file runs code: weights are loaded with ``torch.load(weights_only=True)``
(``--unsafe-load`` lifts that for trusted files), and factories come only from the command line.
"""
from __future__ import annotations

import argparse
import importlib
import zipfile
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np
import torch

from trainer.checkpoint import CHECKPOINTS_DIR, SHARD_PREFIX, TRAINER_FILE, list_checkpoints

_BACKBONE_KEYS = ("backbone", "state_dict_backbone", "model", "state_dict")


class OnnxModule(torch.nn.Module):
    """An ONNX model run by onnxruntime behind the ``nn.Module`` interface (CPU tensors out)."""

    def __init__(self, path: Union[str, Path], providers: Optional[list] = None):
        super().__init__()
        import onnxruntime as ort

        self.path = str(path)
        if providers is None:
            avail = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
        try:
            self.session = ort.InferenceSession(self.path, providers=providers)
        except Exception as e:
            raise ValueError(f"{self.path}: onnxruntime cannot load this model: {e}") from e
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run([self.output_name], {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)


def resolve_factory(network: str) -> Callable[..., torch.nn.Module]:
    """``package.module:factory`` -> the callable; a bare name -> the trainer's backbone factory."""
    if ":" in network:
        mod_name, _, attr = network.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"--network {network}: cannot import module '{mod_name}': {e}") from e
        try:
            return getattr(mod, attr)
        except AttributeError as e:
            raise ValueError(f"--network {network}: module '{mod_name}' has no '{attr}'") from e
    try:
        from trainer.backbones import get_backbone  # lands with the trainer branch
    except ImportError as e:
        raise ValueError(
            f"--network {network}: trainer.backbones.get_backbone is not available ({e}); "
            "pass a 'package.module:factory' spec instead"
        ) from e
    return lambda num_features=512, **kw: get_backbone(network, num_features=num_features, **kw)


def parse_kwargs(text: str) -> dict:
    """``--network-kwargs`` parser: a YAML/JSON mapping such as ``'{width: 8, dropout: 0.0}'``."""
    import yaml

    try:
        val = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not a YAML/JSON mapping: {text!r} ({e})") from e
    if val is None:
        return {}
    if not isinstance(val, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping like '{{width: 8}}', got {text!r}")
    return val


def clean_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip ``module.`` (DDP) and ``backbone.`` prefixes."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _extract_state_dict(obj, where: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in _BACKBONE_KEYS:
            if key in obj and isinstance(obj[key], dict):
                return _extract_state_dict(obj[key], f"{where}['{key}']")
    raise ValueError(f"{where}: no backbone state_dict found (looked for tensors or keys {list(_BACKBONE_KEYS)})")


def _infer_num_features(sd: Dict[str, torch.Tensor]) -> Optional[int]:
    # insightface backbones end in `features` (BatchNorm1d) after `fc`
    for key in ("features.weight", "features.running_mean", "fc.weight"):
        if key in sd:
            return int(sd[key].shape[0])
    return None


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())


def _newest_complete_step(checkpoints: Path) -> Optional[Path]:
    """trainer.pt of the newest complete checkpoint (trainer.checkpoint's layout)."""
    done = [p for _, p in list_checkpoints(checkpoints) if (p / TRAINER_FILE).is_file()]
    return done[-1] / TRAINER_FILE if done else None


def checkpoint_file(directory: Path) -> Path:
    """The weights file of a run / checkpoint directory.

    Order: ``model.pt`` (final backbone, insightface's layout), ``trainer.pt`` (a step
    directory of this trainer), the newest complete ``checkpoints/step_*/trainer.pt``,
    else the newest ``*.pt``/``*.pth`` that is not a Partial FC shard.
    """
    directory = Path(directory)
    for name in ("model.pt", TRAINER_FILE):
        if (directory / name).is_file():
            return directory / name
    for sub in (directory / CHECKPOINTS_DIR, directory):
        found = _newest_complete_step(sub) if sub.is_dir() else None
        if found is not None:
            return found
    cands = [
        p for p in list(directory.glob("*.pt")) + list(directory.glob("*.pth")) if not p.name.startswith(SHARD_PREFIX)
    ]
    if not cands:
        raise FileNotFoundError(f"{directory}: no model.pt, trainer.pt, checkpoints/step_*/trainer.pt or *.pt/*.pth")
    return max(cands, key=lambda p: p.stat().st_mtime)


def _model_config(weights: Path, obj) -> Optional[dict]:
    """The ``model`` section of the checkpoint's resolved config: from the checkpoint itself
    (``config``), a ``config.yaml`` next to it, or the run's
    (``<run>/checkpoints/step_X/trainer.pt`` -> ``<run>/config.yaml``)."""

    def section(cfg) -> Optional[dict]:
        if not isinstance(cfg, dict):
            return None
        if isinstance(cfg.get("model"), dict) and isinstance(cfg["model"].get("backbone"), str):
            m = dict(cfg["model"])
            # constructor options as trained: the model section's (width, norm, dropout), or
            # the v0.1 layout's free-form backbone_kwargs
            opts = {k: m[k] for k in ("width", "norm") if m.get(k) is not None}
            m["backbone_kwargs"] = {**(m.get("backbone_kwargs") or {}), **opts}
            return m
        if isinstance(cfg.get("network"), str):  # insightface-style flat config
            return {"backbone": cfg["network"], "embedding_size": cfg.get("embedding_size")}
        return None

    if isinstance(obj, dict) and section(obj.get("config")):
        return section(obj["config"])
    dirs = [weights.parent]
    if weights.parent.parent.name == CHECKPOINTS_DIR:  # <run>/checkpoints/step_X/trainer.pt
        dirs.append(weights.parent.parent.parent)
    for d in dirs:
        cfg_path = d / "config.yaml"
        if cfg_path.is_file():
            import yaml

            with open(cfg_path) as f:
                found = section(yaml.safe_load(f))
            if found:
                return found
    return None


def load_model(
    spec: Union[str, Path],
    network: Optional[str] = None,
    num_features: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    unsafe_load: bool = False,
    network_kwargs: Optional[dict] = None,
) -> torch.nn.Module:
    """Build the model named by ``spec`` (see the module docstring), in eval mode on ``device``.

    ``network`` defaults to the checkpoint's config (``model.backbone``) when it has one;
    ``network_kwargs`` (extra constructor keywords, e.g. ``{"width": 8}`` for ``tiny``)
    default to that config's backbone options (``model.width``/``model.norm``; older runs:
    ``model.backbone_kwargs``) when it names the same backbone.
    ``unsafe_load`` allows ``torch.load(weights_only=False)`` (arbitrary pickles: trusted files only).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    spec_s = str(spec)
    path = Path(spec_s)
    if not path.exists() and ":" in spec_s and not spec_s.endswith((".pt", ".pth", ".onnx")):
        model = resolve_factory(spec_s)()
        return model.to(device).eval()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.suffix == ".onnx":
        return OnnxModule(path)
    from_dir = path.is_dir()
    if from_dir:
        path = checkpoint_file(path)
    if _is_torchscript(path):
        if from_dir:  # TorchScript is code: run it only when the user named the file
            raise ValueError(f"{path}: a TorchScript archive (it carries code) found in the folder {spec_s}; "
                             "pass the file itself as --model if you trust it")
        return torch.jit.load(str(path), map_location=device).eval()
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not unsafe_load)
    except Exception as e:
        hint = "" if unsafe_load else " (a trusted file holding other objects loads with --unsafe-load)"
        raise ValueError(f"{path}: cannot read weights with torch.load: {e}{hint}") from e
    if isinstance(obj, torch.nn.Module):  # a whole pickled module (only with unsafe_load)
        return obj.to(device).eval()
    cfg = _model_config(path, obj)
    if network is None and cfg is not None:
        if ":" in cfg["backbone"]:
            raise ValueError(
                f"{path}: the run's configuration names the factory '{cfg['backbone']}' (code to import and "
                "call); a factory is used only when given on the command line: pass "
                f"--network {cfg['backbone']} if you trust it")
        network = cfg["backbone"]
    if network is None:
        raise ValueError(f"{path}: a state_dict needs --network (e.g. r50, or package.module:factory)")
    kwargs = dict(network_kwargs or {})
    source = "--network-kwargs"
    if network_kwargs is None and cfg is not None and cfg["backbone"] == network:
        kwargs = dict(cfg.get("backbone_kwargs") or {})  # e.g. tiny's width, as trained
        source = "the run's configuration (config.yaml / the checkpoint's config)"
    sd = clean_state_dict(_extract_state_dict(obj, str(path)))
    nf = num_features or _infer_num_features(sd) or 512
    factory = resolve_factory(network)
    try:
        model = factory(num_features=nf, **kwargs)
    except (TypeError, ValueError) as e:
        if kwargs:
            raise ValueError(f"{path}: network '{network}' does not take the options {kwargs} from {source}: "
                             f"{e}") from e
        model = factory()
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit network '{network}': {e}") from e
    return model.to(device).eval()


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu`` (the CLIs' ``--device`` default)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_args(
    p: argparse.ArgumentParser, what: str = "model.pt | checkpoint dir | TorchScript | model.onnx | module:factory"
) -> None:
    """The model-loading flags every eval CLI shares (``--model``, ``--network``, ...)."""
    p.add_argument("--model", required=True, help=what)
    p.add_argument("--network", default=None,
                   help="backbone name (r18..r200, mbf, tiny) or module:factory, for state_dicts "
                        "(default: from the checkpoint's config)")
    p.add_argument("--num-features", type=int, default=None, help="embedding size (default: read from the weights)")
    p.add_argument("--unsafe-load", action="store_true", help="torch.load(weights_only=False): trusted files only")
    p.add_argument("--network-kwargs", type=parse_kwargs, default=None,
                   help="extra backbone constructor keywords, YAML/JSON mapping, e.g. '{width: 8}' "
                        "(default: from the checkpoint's config)")


def model_from_args(args: argparse.Namespace, device: Union[str, torch.device, None]) -> torch.nn.Module:
    """:func:`load_model` from the flags of :func:`add_model_args`."""
    return load_model(args.model, args.network, args.num_features, device, unsafe_load=args.unsafe_load,
                      network_kwargs=args.network_kwargs)
